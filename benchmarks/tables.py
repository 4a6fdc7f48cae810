"""Embedding tables: rows/s and MB/s of Table.pull, push and push_pull (labelled pull_rows, push_rows, push_pull_rows) vs shard count.

Workload: Criteo-like batches of 4096 examples x 26 categorical fields; each
field draws its ids Zipf(1.15) (or uniformly, the control) over its own
range, the fields together covering ``--vocab`` distinct ids; Adagrad. Rows
are created by the pushes, as in training. Measured in the same run, taking
turns round after round after a warm-up:

- shardps at each shard count (``--shards``);
- THE BASELINE in the original example's style: one Ray actor holding
  ``{id: row}`` and applying Adagrad per id in Python (``DictTable``);
- the physical limit: the same batch against one in-process numpy table
  indexed by id (gather; sort-based segment sum and a vectorised Adagrad
  scatter), no Ray, no hashing (``NumpyTable``).

Also reported: the unique fraction of a batch, per-shard row balance and the
bytes per row of one table (``EmbeddingTable``) filled with ``--memory-rows``
distinct ids, counted and as resident memory in a fresh process.

    python -m benchmarks.tables --out bench-out/tables                      # full sweep
    python -m benchmarks.tables --vocab 1e4 --dims 4 --shards 1 2 --rounds 1  # seconds
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray

import shardps
from shardps.store.ids import segment_sum
from benchmarks.common import add_cluster_args, connect, median, print_table, write_rows

OPS = ("pull_rows", "push_rows", "push_pull_rows")
LR, EPS = 0.05, 1e-7  # Adagrad as shardps.Adagrad(lr=0.05) applies it


def batches(vocab: int, *, fields: int, examples: int, count: int, dist: str, seed: int = 0) -> list[np.ndarray]:
    """``count`` batches of ``examples * fields`` int64 ids in ``[0, vocab)``; field f owns ids
    ``[f * vocab // fields, (f + 1) * vocab // fields)``, rank r of a field is its r-th id."""
    rng = np.random.default_rng(seed)
    per_field = vocab // fields
    if dist == "zipf":
        cdf = np.cumsum(np.arange(1, per_field + 1, dtype=np.float64) ** -1.15)
        cdf /= cdf[-1]

        def draw(n):
            return np.minimum(np.searchsorted(cdf, rng.random(n)), per_field - 1)
    else:
        def draw(n):
            return rng.integers(0, per_field, n)
    offsets = np.arange(fields, dtype=np.int64) * per_field
    return [(draw(examples * fields).reshape(examples, fields) + offsets).ravel() for _ in range(count)]


class DictTable:
    """THE BASELINE, the original example's style: one actor, ``{id: row}``, Adagrad per id in Python."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim, self.rows, self.acc = dim, {}, {}
        self.rng = np.random.default_rng(seed)

    def pull(self, ids):
        zero = np.zeros(self.dim, np.float32)
        return np.stack([self.rows.get(i, zero) for i in ids.tolist()])

    def push(self, ids, grads):
        summed: dict = {}
        for i, g in zip(ids.tolist(), grads):
            summed[i] = summed[i] + g if i in summed else g
        for i, g in summed.items():
            if i not in self.rows:
                self.rows[i] = self.rng.uniform(-0.05, 0.05, self.dim).astype(np.float32)
                self.acc[i] = np.zeros(self.dim, np.float32)
            self.acc[i] += g * g
            self.rows[i] -= LR * g / (np.sqrt(self.acc[i]) + EPS)

    def push_pull(self, ids, grads, pull_ids):
        self.push(ids, grads)
        return self.pull(pull_ids)

    def size(self) -> int:
        return len(self.rows)


class NumpyTable:
    """The physical limit: one dense in-process array indexed by id (every id < ``vocab``)."""

    def __init__(self, vocab: int, dim: int):
        self.params = np.zeros((vocab, dim), np.float32)  # calloc: pages appear as rows are touched
        self.acc = np.zeros((vocab, dim), np.float32)

    def pull(self, ids):
        return self.params[ids]

    def push(self, ids, grads):
        unique, summed = segment_sum(ids, grads)
        acc = self.acc[unique] + summed * summed
        self.acc[unique] = acc
        self.params[unique] -= LR * summed / (np.sqrt(acc) + EPS)

    def push_pull(self, ids, grads, pull_ids):
        self.push(ids, grads)
        return self.pull(pull_ids)


def _ops(system, ids, grads) -> dict:
    if isinstance(system, shardps.Router):
        return {"pull_rows": lambda: system.table("t").pull(ids), "push_rows": lambda: system.table("t").push(ids, grads),
                "push_pull_rows": lambda: system.table("t").push_pull(ids, grads, ids)}
    if isinstance(system, NumpyTable):
        return {"pull_rows": lambda: system.pull(ids), "push_rows": lambda: system.push(ids, grads),
                "push_pull_rows": lambda: system.push_pull(ids, grads, ids)}
    return {"pull_rows": lambda: ray.get(system.pull.remote(ids)),
            "push_rows": lambda: ray.get(system.push.remote(ids, grads)),
            "push_pull_rows": lambda: ray.get(system.push_pull.remote(ids, grads, ids))}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(vocab: int, dim: int, dist: str, args) -> tuple[list[dict], list[dict]]:
    """Rows (one per system, shard count and op) and per-shard loads for one workload."""
    work = batches(vocab, fields=args.fields, examples=args.examples, count=args.batches, dist=dist, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    grads = [(1e-3 * rng.standard_normal((len(ids), dim))).astype(np.float32) for ids in work]
    unique = [len(np.unique(ids)) for ids in work]
    placed = {"num_cpus": 0.01, "resources": args.server_resources}
    with contextlib.ExitStack() as stack:
        systems: dict = {}
        if args.dict_baseline:
            actor = ray.remote(DictTable).options(**placed).remote(dim, args.seed)
            stack.callback(ray.kill, actor)
            systems["dict actor", 1] = actor
        if args.numpy_baseline:
            systems["numpy in-process", 1] = NumpyTable(vocab, dim)
        for s in args.shards:
            ps = stack.enter_context(shardps.launch(s, shard_resources=args.server_resources))
            ps.register_table("t", dim=dim, optimizer=shardps.Adagrad(lr=LR))
            systems["shardps", s] = ps
        seconds = {(key, op): [] for key in systems for op in OPS}
        for r in range(args.warmup + args.rounds):
            for key, system in systems.items():
                b = r % len(work)
                for op, fn in _ops(system, work[b], grads[b]).items():
                    elapsed = _timed(fn)
                    if r >= args.warmup:
                        seconds[key, op].append(elapsed)
            print(f"  vocab {vocab:.0e} dim {dim} {dist}: round {r + 1}/{args.warmup + args.rounds}", flush=True)
        loads = [_load(vocab, dim, dist, s, ps) for (name, s), ps in systems.items() if name == "shardps"]
    ids_per_batch = args.fields * args.examples
    rows = []
    for ((name, s), op), times in seconds.items():
        t = median(times)
        moved = median(unique) * dim * 4 * (2 if op == "push_pull_rows" else 1)
        rows.append({"vocab": vocab, "dim": dim, "dist": dist, "system": name, "shards": s, "op": op,
                     "ids": ids_per_batch, "unique_fraction": median(unique) / ids_per_batch, "median_s": t,
                     "min_s": min(times), "max_s": max(times), "rounds": len(times),
                     "rows_s": ids_per_batch / t, "mb_s": moved / t / 1e6})
    return rows, loads


def _load(vocab, dim, dist, shards, ps) -> dict:
    per_shard = [stat["tables"]["t"]["rows"] for stat in ps.stats()]
    nbytes = sum(stat["tables"]["t"]["bytes"] for stat in ps.stats())
    mean = sum(per_shard) / len(per_shard)
    return {"vocab": vocab, "dim": dim, "dist": dist, "shards": shards, "rows": sum(per_shard),
            "max_over_mean": max(per_shard) / mean if mean else 1.0, "bytes_per_row": nbytes / max(1, sum(per_shard)),
            "rows_per_shard": per_shard}


_MEMORY_PROBE = """
import json, os, sys
import numpy as np
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.optim import Adagrad
from shardps.store.initializers import Uniform
rows, dim = int(sys.argv[1]), int(sys.argv[2])
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
ids = np.random.default_rng(0).permutation(rows).astype(np.int64) * 7919
grads = np.ones((min(rows, 100_000), dim), np.float32)
table = EmbeddingTable("t", dim, initializer=Uniform(-0.05, 0.05), optimizer=Adagrad(lr=0.05))
before = resident()
for i in range(0, rows, len(grads)):
    table.push(ids[i:i + len(grads)], grads[:len(ids[i:i + len(grads)])])
print(json.dumps({"rows": len(table), "bytes_per_row": table.nbytes / len(table),
                  "resident_per_row": (resident() - before) / len(table)}))
"""


def memory(rows: int, dim: int) -> dict:
    """Bytes per row of one Adagrad table holding ``rows`` rows, measured in a fresh process.

    ``resident_per_row`` is measured twice: with glibc's default allocator settings (whose heap keeps
    freed temporaries) and with ``MALLOC_MMAP_THRESHOLD_=1 MiB`` (large blocks go back to the kernel).
    """
    out = {"rows": rows, "dim": dim, "raw_plus_optimizer": 2 * dim * 4}
    for label, extra in (("", {}), ("_mmap_1mib", {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})):
        probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(rows), str(dim)], check=True,
                               capture_output=True, text=True, env={**os.environ, **extra})
        measured = json.loads(probe.stdout)
        out["bytes_per_row"] = measured["bytes_per_row"]
        out[f"resident_per_row{label}"] = measured["resident_per_row"]
    out["overhead_per_row"] = out["bytes_per_row"] - out["raw_plus_optimizer"]
    return out


def targets(rows: list[dict], loads: list[dict], mem: list[dict]) -> list[dict]:
    """The issue's targets, from this run's medians."""
    out = []

    def pick(system, shards, op, **where):
        return [r for r in rows if r["system"] == system and r["shards"] == shards and r["op"] == op
                and all(r[k] == v for k, v in where.items())]

    for mine in pick("shardps", 1, "push_pull_rows"):
        where = {k: mine[k] for k in ("vocab", "dim", "dist")}
        label = f"vocab {mine['vocab']:.0e} dim {mine['dim']} {mine['dist']}"
        for base in pick("dict actor", 1, "push_pull_rows", **where):
            ratio = mine["rows_s"] / base["rows_s"]
            out.append({"target": f"{label}: push_pull_rows 1 shard / dict actor >= 5x", "value": ratio,
                        "ok": ratio >= 5})
        for base in pick("numpy in-process", 1, "push_pull_rows", **where):
            ratio = mine["median_s"] / base["median_s"]
            out.append({"target": f"{label}: push_pull_rows 1 shard time / numpy in-process <= 4x", "value": ratio,
                        "ok": ratio <= 4})
    for load in loads:
        if load["shards"] == 8 and load["dist"] == "zipf":
            out.append({"target": f"vocab {load['vocab']:.0e} dim {load['dim']}: rows max/mean at 8 shards <= 1.05",
                        "value": load["max_over_mean"], "ok": load["max_over_mean"] <= 1.05})
    for m in mem:
        out.append({"target": f"{m['rows']:.0e} rows dim {m['dim']}: bytes/row - (row + Adagrad) <= 32",
                    "value": m["overhead_per_row"], "ok": m["overhead_per_row"] <= 32})
    return out


def plot(rows: list[dict], path: Path) -> None:
    """push_pull_rows rows/s vs shards per workload; the two baselines as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys((r["vocab"], r["dim"], r["dist"]) for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (vocab, dim, dist) in enumerate(workloads):
        mine = [r for r in rows if (r["vocab"], r["dim"], r["dist"]) == (vocab, dim, dist)
                and r["op"] == "push_pull_rows"]
        ours = sorted((r["shards"], r["rows_s"]) for r in mine if r["system"] == "shardps")
        ax.plot(*zip(*ours), "o-", color=f"C{i}", label=f"{vocab:.0e} ids, dim {dim}, {dist}")
        for r in mine:
            if r["system"] != "shardps":
                style = "--" if r["system"] == "dict actor" else ":"
                ax.axhline(r["rows_s"], color=f"C{i}", linestyle=style, linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("shards")
    ax.set_ylabel("push_pull_rows: ids per second")
    ax.set_title("Embedding tables, one client (dashed: dict actor; dotted: in-process numpy)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardps bench tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=float, nargs="+", default=[1e6, 1e7], help="distinct ids over all fields")
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    p.add_argument("--dists", nargs="+", choices=["zipf", "uniform"], default=["zipf", "uniform"])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--examples", type=int, default=4096, help="examples per batch")
    p.add_argument("--fields", type=int, default=26, help="categorical fields per example")
    p.add_argument("--batches", type=int, default=8, help="distinct batches, used in turn")
    p.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    p.add_argument("--rounds", type=int, default=7, help="measured rounds (each op once per system per round)")
    p.add_argument("--memory-rows", type=float, nargs="*", default=[1e6, 1e7],
                   help="bytes/row measured at these table sizes (none: skip)")
    p.add_argument("--no-dict-baseline", dest="dict_baseline", action="store_false")
    p.add_argument("--no-numpy-baseline", dest="numpy_baseline", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/tables"))
    add_cluster_args(p, "the shards and the dict actor")
    return p


def main(argv=None) -> list[dict]:
    args = _parser().parse_args(argv)
    started = connect(args)
    try:
        rows, loads = [], []
        for vocab, dim, dist in itertools.product(args.vocab, args.dims, args.dists):
            more, more_loads = measure(int(vocab), dim, dist, args)
            rows += more
            loads += more_loads
    finally:
        if started:
            ray.shutdown()
    mem = [memory(int(n), dim) for n in args.memory_rows for dim in args.dims]
    write_rows(args.out, "tables", rows)
    write_rows(args.out, "table_load", [{**load, "rows_per_shard": " ".join(map(str, load["rows_per_shard"]))}
                                        for load in loads])
    write_rows(args.out, "table_memory", mem)
    goals = targets(rows, loads, mem)
    write_rows(args.out, "table_targets", goals)
    plot(rows, args.out / "tables.png")
    print_table(rows, ["vocab", "dim", "dist", "system", "shards", "op", "unique_fraction", "rows_s", "mb_s",
                       "median_s", "min_s", "max_s"])
    print_table(loads, ["vocab", "dim", "dist", "shards", "rows", "max_over_mean", "bytes_per_row"])
    if mem:
        print_table(mem, ["rows", "dim", "raw_plus_optimizer", "bytes_per_row", "overhead_per_row",
                          "resident_per_row", "resident_per_row_mmap_1mib"])
    print_table(goals, ["target", "value", "ok"])
    return rows


if __name__ == "__main__":
    main()
