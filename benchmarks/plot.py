"""PNG plots of benchmark results (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def plot_throughput(rows: list[dict], path: Path, *, op: str = "push+pull", title: str | None = None) -> None:
    """Throughput vs shard count, one line per workload (push adds, one client); the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["workload"] for r in rows))
    for i, name in enumerate(names):
        color = f"C{i}"
        mine = sorted((r["shards"], r["mb_s"]) for r in rows if r["workload"] == name and r["system"] == "shardps"
                      and r["op"] == op and r["clients"] == 1 and r["optimizer"] == "add")
        if mine:
            ax.plot(*zip(*mine), "o-", color=color, label=f"{name} (shardps)")
        base = [r["mb_s"] for r in rows if r["workload"] == name and r["system"] == "baseline" and r["op"] == op
                and r["clients"] == 1]
        if base:
            ax.axhline(base[0], color=color, linestyle="--", linewidth=1, label=f"{name} (baseline, 1 actor)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("shards")
    ax.set_ylabel(f"{op} throughput (MB/s)")
    ax.set_title(title or f"{op} throughput vs shard count (push adds, 1 client)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
