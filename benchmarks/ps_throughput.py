"""Parameter-server throughput vs shard count.

Measured in one run, side by side: shardps at each shard count, THE BASELINE
(the original example's single-actor server, benchmarks/baseline.py), and
Ray's own floor (empty calls fanned out to the same number of actors; a bare
``ray.put``/``ray.get`` of the same bytes; sending the same arrays to one
actor that does nothing). Medians over repeats after warm-up.

    python -m benchmarks.ps_throughput --out bench-out            # full sweep
    python -m benchmarks.ps_throughput --scale 0.001 --repeats 3  # seconds
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import ray

import shardps
from benchmarks.baseline import BaselineServer
from benchmarks.common import arrays, median, print_table, time_op, workloads, write_rows

OPTIMIZERS = {"sgd": lambda: shardps.SGD(lr=0.01), "adam": lambda: shardps.Adam(lr=0.001)}


class _Sink:
    """Receives arrays and does nothing: the cost of moving the bytes to an actor."""

    def take(self, *values):
        return None


class _Client:
    """A concurrent client (Ray actor): pushes through a router copy or to the baseline."""

    def __init__(self, target, shapes, seed):
        self.target = target
        self.values = arrays(shapes, seed=seed, scale=1e-3)

    def push(self, times: int) -> None:
        for _ in range(times):
            if isinstance(self.target, shardps.Router):
                self.target.push(self.values)
            else:
                ray.get(self.target.push.remote(list(self.values), list(self.values.values())))


def _ops_shardps(ps, values):
    keys = list(values)
    return {
        "push": lambda: ps.push(values),
        "pull": lambda: ps.pull(keys),
        "push+pull": lambda: (ps.push(values), ps.pull(keys)),
        "push_pull": lambda: ps.push_pull(values, keys),
    }


def _ops_baseline(server, values):
    keys, vals = list(values), list(values.values())
    return {
        "push": lambda: ray.get(server.push.remote(keys, vals)),
        "pull": lambda: ray.get(server.pull.remote(keys)),
        "push+pull": lambda: (ray.get(server.push.remote(keys, vals)), ray.get(server.pull.remote(keys))),
    }


def _row(workload, optimizer, system, shards, clients, op, nbytes, seconds, **extra):
    moved = 2 * nbytes if op in ("push+pull", "push_pull") else nbytes
    return {"workload": workload, "optimizer": optimizer, "system": system, "shards": shards, "clients": clients,
            "op": op, "bytes": nbytes, "median_s": seconds, "mb_s": moved / seconds / 1e6, "ops_s": 1 / seconds,
            **extra}


def _timing(args) -> dict:
    return {"min_repeats": args.repeats, "max_repeats": max(args.repeats, 30), "min_seconds": args.min_seconds}


def _concurrent(target, shapes, num_clients: int, pushes: int, repeats: int) -> float:
    """Median wall seconds for ``num_clients`` actors to push ``pushes`` times each."""
    clients = [ray.remote(_Client).options(num_cpus=0.01).remote(target, shapes, i) for i in range(num_clients)]
    try:
        ray.get([c.push.remote(1) for c in clients])  # warm-up
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ray.get([c.push.remote(pushes) for c in clients])
            walls.append(time.perf_counter() - t0)
        return median(walls)
    finally:
        for c in clients:
            ray.kill(c)


def measure_workload(name, shapes, args, rows, loads) -> None:
    """Append rows for one workload: baseline, floors and shardps at every shard count."""
    values = arrays(shapes, scale=1e-3)
    nbytes = sum(v.nbytes for v in values.values())
    timing = _timing(args)
    server = ray.remote(BaselineServer).options(num_cpus=0.01).remote(list(values), list(values.values()))
    sink = ray.remote(_Sink).options(num_cpus=0.01).remote()
    try:
        for op, fn in _ops_baseline(server, values).items():
            rows.append(_row(name, "add", "baseline", 1, 1, op, nbytes, median(time_op(fn, **timing))))
        ref_values = list(values.values())
        rows.append(_row(name, "-", "floor", 1, 1, "put+get", nbytes,
                         median(time_op(lambda: ray.get(ray.put(ref_values)), **timing))))
        rows.append(_row(name, "-", "floor", 1, 1, "send", nbytes,
                         median(time_op(lambda: ray.get(sink.take.remote(*ref_values)), **timing))))
        if args.clients > 1:
            wall = _concurrent(server, shapes, args.clients, args.client_pushes, args.repeats)
            rows.append(_row(name, "add", "baseline", 1, args.clients, "push", nbytes * args.clients * args.client_pushes, wall))
    finally:
        ray.kill(server)
        ray.kill(sink)
    for opt_name in args.optimizers:
        for num_shards in args.shards:
            with shardps.launch(num_shards, optimizer=OPTIMIZERS[opt_name](), block_bytes=args.block_bytes) as ps:
                ps.register(values)
                involved = sorted({s for key in values for s, _, _ in ps.placement(key)})
                fanout = median(time_op(lambda: ray.get([ps.shards[s].ping.remote() for s in involved]), **timing))
                rows.append(_row(name, "-", "floor", len(involved), 1, "fanout", 0, fanout))
                for op, fn in _ops_shardps(ps, values).items():
                    rows.append(_row(name, opt_name, "shardps", num_shards, 1, op, nbytes,
                                     median(time_op(fn, **timing)), involved=len(involved)))
                if args.clients > 1:
                    wall = _concurrent(ps, shapes, args.clients, args.client_pushes, args.repeats)
                    rows.append(_row(name, opt_name, "shardps", num_shards, args.clients, "push",
                                     nbytes * args.clients * args.client_pushes, wall))
                stats = ps.stats()
                pushes = sum(s["pushes"] for s in stats) or 1
                loads.extend({"workload": name, "optimizer": opt_name, "shards": num_shards, "shard": s["shard"],
                              "bytes": s["bytes"], "push_share": s["pushes"] / pushes} for s in stats)
        print(f"  {name}/{opt_name} done", flush=True)


def add_ratios(rows: list[dict]) -> None:
    """``vs_baseline``: shardps throughput / baseline throughput for the same workload, op and clients."""
    base = {(r["workload"], r["op"], r["clients"]): r["mb_s"] for r in rows if r["system"] == "baseline"}
    for r in rows:
        ref = base.get((r["workload"], "push+pull" if r["op"] == "push_pull" else r["op"], r["clients"]))
        if r["system"] == "shardps" and ref:
            r["vs_baseline"] = r["mb_s"] / ref


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's must-show figures, each with its measured value and verdict."""
    def get(**match):
        found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
        return found[0] if found else None

    results = []
    for r in rows:
        if r["system"] == "shardps" and r["shards"] == 1 and r["clients"] == 1 and r["optimizer"] == "sgd" \
                and r["op"] in ("push", "pull"):
            results.append({"target": f"1 shard vs baseline, {r['workload']} {r['op']} >= 0.95",
                            "value": r.get("vs_baseline"), "ok": (r.get("vs_baseline") or 0) >= 0.95})
    for r in rows:
        if r["workload"] == "tiny" and r["system"] == "shardps" and r["optimizer"] == "sgd" and r["clients"] == 1 \
                and r["op"] in ("push_pull", "push+pull"):
            floor = get(workload="tiny", system="floor", op="fanout", shards=r["involved"])
            if floor:
                ratio = r["median_s"] / (floor["median_s"] * (2 if r["op"] == "push+pull" else 1))
                results.append({"target": f"tiny {r['op']} latency, {r['shards']} shards <= 1.2x fan-out floor"
                                          f" ({'2 fan-outs' if r['op'] == 'push+pull' else '1 fan-out'})",
                                "value": ratio, "ok": ratio <= 1.2})
    one, two = get(workload="big", optimizer="adam", shards=1, op="push", clients=1), \
        get(workload="big", optimizer="adam", shards=2, op="push", clients=1)
    if one and two:
        ratio = two["mb_s"] / one["mb_s"]
        results.append({"target": "Adam 100 MB push: 2 shards >= 1.6x 1 shard", "value": ratio, "ok": ratio >= 1.6})
    clients = [r for r in rows if r["workload"] == "model10x100k" and r["clients"] > 1 and r["op"] == "push"]
    two = [r for r in clients if r["system"] == "shardps" and r["shards"] == 2 and r["optimizer"] == "sgd"]
    if two and two[0].get("vs_baseline"):
        results.append({"target": f"{two[0]['clients']} clients, 10x100k push: 2 shards >= 1.5x baseline",
                        "value": two[0]["vs_baseline"], "ok": two[0]["vs_baseline"] >= 1.5})
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardps bench ps", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workloads", nargs="+", default=list(workloads()), choices=list(workloads()))
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=list(OPTIMIZERS))
    p.add_argument("--clients", type=int, default=4, help="concurrent client actors (1: skip)")
    p.add_argument("--client-pushes", type=int, default=10, help="pushes per client per repeat")
    p.add_argument("--repeats", type=int, default=7, help="minimum timed repeats (median reported)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="minimum timed seconds per measurement")
    p.add_argument("--scale", type=float, default=1.0, help="shrink tensor sizes (smoke tests)")
    p.add_argument("--block-bytes", type=int, default=shardps.partition.DEFAULT_BLOCK_BYTES)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if min(args.shards) < 1 or args.repeats < 1 or args.scale <= 0 or args.clients < 1:
        p.error("--shards, --repeats, --clients must be >= 1 and --scale > 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        shardps.cluster.start_ray(num_cpus=args.num_cpus)
    try:
        rows, loads = [], []
        for name in args.workloads:
            measure_workload(name, workloads(args.scale)[name], args, rows, loads)
    finally:
        if started:
            ray.shutdown()
    add_ratios(rows)
    targets = check_targets(rows)
    write_rows(args.out, "ps_throughput", rows)
    write_rows(args.out, "shard_load", loads)
    write_rows(args.out, "ps_targets", targets)
    print_table(rows, ["workload", "optimizer", "system", "shards", "clients", "op", "median_s", "mb_s", "ops_s",
                       "vs_baseline"])
    print()
    print_table(targets, ["target", "value", "ok"])
    if not args.no_plot:
        from benchmarks.plot import plot_throughput

        plot_throughput(rows, args.out / "ps_throughput.png")
    return rows


if __name__ == "__main__":
    main()
