"""Where the CPU goes when clients push or pull: CPU-ms per call, by process kind.

Explains the concurrent-clients result on a 2-core machine: when every
process shares two cores, throughput is total CPU per push, not server
parallelism. Reads utime+stime from /proc for every Ray process.

    python -m benchmarks.cpu_accounting --shards 2 --clients 4
    python -m benchmarks.cpu_accounting --shards 1 --clients 1 --calls 100 --workload cnn --ops push pull
"""
from __future__ import annotations

import argparse
import math
import os
import time

import ray

import shardps
from benchmarks.baseline import BaselineServer
from benchmarks.common import arrays, median, print_table, warm_calls, workloads
from benchmarks.ps_throughput import _Client
from shardps.store.cluster import start_ray

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_by_kind() -> dict[str, float]:
    """CPU seconds so far of every process, summed by kind (its title: ray::Actor, raylet, ...)."""
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kind = title.split(".")[0] if title.startswith("ray::") else os.path.basename(title.split()[0] if title else "?")
        if int(pid) == os.getpid():
            kind = "driver"
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def measure(actors: list, calls: int, op: str) -> tuple[float, dict]:
    """``(wall s, {process kind: CPU-ms per call})`` while the client ``actors`` each make ``calls`` ``op`` calls."""
    before, t0 = _cpu_by_kind(), time.perf_counter()
    ray.get([getattr(a, op).remote(calls) for a in actors])
    wall, after = time.perf_counter() - t0, _cpu_by_kind()
    n = len(actors) * calls
    return wall, {k: 1000 * (after[k] - before.get(k, 0.0)) / n for k in after if after[k] - before.get(k, 0.0) > 0}


def _clients(target, shapes, count: int, warm: int) -> list:
    """``count`` client actors of ``target``, each warmed up by ``warm`` pushes (see ``warm_calls``) and a pull."""
    actors = [ray.remote(_Client).options(num_cpus=0.01).remote(target, shapes, i) for i in range(count)]
    ray.get([a.push.remote(max(2, warm)) for a in actors])
    ray.get([a.pull.remote(2) for a in actors])
    return actors


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="shardps bench cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--calls", "--pushes", type=int, default=50, help="calls per client per round")
    p.add_argument("--rounds", type=int, default=3, help="the two servers take turns; medians over rounds")
    p.add_argument("--workload", default="model10x100k")
    p.add_argument("--ops", nargs="+", default=["push"], choices=["push", "pull"])
    p.add_argument("--object-store-mb", type=int, default=1000, help="object store of the local Ray, MB")
    args = p.parse_args(argv)
    started = start_ray(num_cpus=os.cpu_count(), object_store_bytes=args.object_store_mb * 10**6)
    shapes = workloads()[args.workload]
    values = arrays(shapes, scale=1e-3)
    nbytes = sum(v.nbytes for v in values.values())
    warm = max(warm_calls(args.object_store_mb, nbytes),  # every client, and every shard, sees the whole store
               math.ceil(warm_calls(args.object_store_mb, nbytes, args.shards) / args.clients))
    rows: list[dict] = []
    server = ray.remote(BaselineServer).options(num_cpus=0.01).remote(list(values), list(values.values()))
    try:
        with shardps.launch(args.shards, optimizer=shardps.SGD(lr=-1.0)) as ps:
            ps.register(values)
            systems = {"baseline": _clients(server, shapes, args.clients, warm),
                       f"shardps {args.shards} shards": _clients(ps, shapes, args.clients, warm)}
            for op in args.ops:
                runs: dict = {name: [] for name in systems}
                for _ in range(args.rounds):  # both servers up at once, taking turns
                    for name, actors in systems.items():
                        runs[name].append(measure(actors, args.calls, op))
                rows += [_row(name, op, args.clients * args.calls, results) for name, results in runs.items()]
    finally:
        ray.kill(server)
        if started:
            ray.shutdown()
    kinds = sorted({k for r in rows for k in r} - {"system", "op", "wall_ms_per_call", "total_cpu_ms_per_call"})
    print_table(rows, ["system", "op", "wall_ms_per_call", "total_cpu_ms_per_call", *kinds])
    return rows


def _row(system: str, op: str, calls: int, results: list[tuple[float, dict]]) -> dict:
    """Medians over rounds: wall ms per call, total CPU-ms per call and CPU-ms per process kind."""
    kinds = {k for _, cpu in results for k in cpu}
    return {"system": system, "op": op, "wall_ms_per_call": 1000 * median([wall for wall, _ in results]) / calls,
            "total_cpu_ms_per_call": median([sum(cpu.values()) for _, cpu in results]),
            **{k: median([cpu.get(k, 0.0) for _, cpu in results]) for k in sorted(kinds)}}


if __name__ == "__main__":
    main()
