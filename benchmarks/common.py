"""Shared pieces of the benchmarks: workloads, timing, output."""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from shardps.store.wire import INLINE_BYTES

MNIST_CNN = {
    "conv1/kernel": (5, 5, 1, 32), "conv1/bias": (32,), "conv2/kernel": (5, 5, 32, 64), "conv2/bias": (64,),
    "dense1/kernel": (3136, 1024), "dense1/bias": (1024,), "dense2/kernel": (1024, 10), "dense2/bias": (10,),
}


def workloads(scale: float = 1.0) -> dict[str, dict[str, tuple[int, ...]]]:
    """name -> {key: shape} (float32). ``scale`` < 1 shrinks every size (smoke tests)."""
    def n(x):
        return max(1, int(x * scale))

    cnn = MNIST_CNN if scale == 1.0 else {"dense1/kernel": (n(3136), 1024), "dense1/bias": (1024,)}
    return {
        "cnn": cnn,                                                    # 3.3 M floats, 13 MB
        "big": {"big": (n(25_000_000),)},                              # one 100 MB tensor
        "many": {f"t{i:04d}": (1000,) for i in range(n(1000))},        # 1000 x 1k floats
        "tiny": {f"tiny{i}": (10,) for i in range(8)},                 # latency
        "model10x100k": {f"layer{i}": (n(100_000),) for i in range(10)},  # 10 x 100k floats
    }


def arrays(shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def time_op(fn: Callable[[], object], *, warmup: int = 2, min_repeats: int = 5, max_repeats: int = 30,
            min_seconds: float = 1.0) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls; repeats until both minimums are met."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def add_cluster_args(p, servers: str) -> None:
    """``--address``, ``--node-ip``, ``--server-resources`` (JSON Ray resources for ``servers``) and
    ``--object-store-mb``."""
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--object-store-mb", type=int, default=1000,
                   help="object store of the local Ray, MB (the warm-up moves about this much through "
                        "every process, see warm_calls)")
    p.add_argument("--node-ip", help="this host's IP in the cluster (with --address)")
    p.add_argument("--server-resources", type=json.loads, default={},
                   help=f'JSON Ray resources for {servers}, e.g. \'{{"server": 0.01}}\'')


def connect(args) -> bool:
    """Join ``args.address`` or start a local Ray of ``args.num_cpus``; True if this call did (shut it down after)."""
    import ray

    from shardps.store.cluster import start_ray

    if ray.is_initialized():
        return False
    if args.address:
        ray.init(address=args.address, _node_ip_address=args.node_ip)
    else:
        start_ray(num_cpus=args.num_cpus, object_store_bytes=args.object_store_mb * 10**6)
    return True


def median(values) -> float:
    return statistics.median(values)


def write_rows(out_dir: Path, name: str, rows: list[dict]) -> None:
    """``name``.csv and ``name``.json in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(out_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table on stdout."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


WARM_STORE = 1.2  # a process is warm once this many times its object store has passed through it


def warm_calls(store_mb: int | None, nbytes: int, processes: int = 1, most: int = 5000) -> int:
    """Calls of ``nbytes`` each after which ``processes`` server processes sharing them are warm (0: no need).

    Each process maps a page of Ray's object store the first time it touches
    it, and a new object may land anywhere in the store: until ~ the store's
    size has passed through a process, its large sends and receives
    page-fault on every page (measured here: a 100 MB send 38 ms and 70
    CPU-ms cold, 6 ms and 7 CPU-ms warm). A long run is warm; a benchmark
    must get there first. ``store_mb``: the local Ray's object store
    (``None``: a cluster joined with ``--address``, not warmed). Payloads
    small enough to travel inline never touch the store.
    """
    if store_mb is None or nbytes <= INLINE_BYTES:
        return 0
    return min(most, math.ceil(WARM_STORE * store_mb * 10**6 * processes / nbytes))


def shards_involved(ps, keys) -> list[int]:
    """The shards of Router ``ps`` that hold some part of ``keys``, ascending."""
    return sorted({s for key in keys for s, _, _ in ps.placement(key)})


def local_store_mb(args) -> int | None:
    """``--object-store-mb`` when this benchmark started its own Ray, else None."""
    return None if getattr(args, "address", None) else args.object_store_mb
