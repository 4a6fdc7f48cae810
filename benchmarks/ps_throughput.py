"""Parameter-server throughput vs shard count.

Measured in one run, side by side: shardps at each shard count, THE BASELINE
(the original example's single-actor server, benchmarks/baseline.py), and
Ray's own floor (empty calls fanned out to the same number of actors; a bare
``ray.put``/``ray.get`` of the same bytes; sending the same arrays to one
actor that does nothing).

    python -m benchmarks.ps_throughput --out bench-out            # full sweep
    python -m benchmarks.ps_throughput --scale 0.001 --repeats 3  # seconds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import ray

import shardps
from shardps.store.placement import DEFAULT_BLOCK_BYTES
from benchmarks.baseline import BaselineServer
from benchmarks.common import (add_cluster_args, arrays, connect, local_store_mb, median, print_table,
                               shards_involved, time_op, warm_calls, workloads, write_rows)

OPTIMIZERS = {  # "add" is the baseline's own semantics (a push adds), so that row compares like with like
    "add": lambda: shardps.SGD(lr=-1.0), "sgd": lambda: shardps.SGD(lr=0.01), "adam": lambda: shardps.Adam(lr=0.001),
}


_SMALL = bytes(80)  # a tiny payload, like one small push message


class _Sink:
    """Receives arrays and does nothing: the cost of moving the bytes to an actor."""

    def take(self, *values):
        return None


class _Client:
    """A concurrent client (Ray actor): pushes or pulls through a router copy or at the baseline."""

    def __init__(self, target, shapes, seed):
        self.target = target
        self.values = arrays(shapes, seed=seed, scale=1e-3)

    def push(self, times: int) -> None:
        for _ in range(times):
            if isinstance(self.target, shardps.Router):
                self.target.push(self.values)
            else:
                ray.get(self.target.push.remote(list(self.values), list(self.values.values())))

    def pull(self, times: int) -> None:
        for _ in range(times):
            if isinstance(self.target, shardps.Router):
                self.target.pull(list(self.values))
            else:
                ray.get(self.target.pull.remote(list(self.values)))


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
    """One result; ``mb_s`` counts the bytes moved (push+pull moves them twice)."""
    moved = 2 * nbytes if op in ("push+pull", "push_pull") else nbytes
    return {"workload": workload, "optimizer": optimizer, "system": system, "shards": shards, "clients": clients,
            "op": op, "bytes": nbytes, "median_s": seconds, "mb_s": moved / seconds / 1e6, "ops_s": 1 / seconds,
            **extra}


def _interleaved(ops: dict, rounds: int, seconds: float, warm: dict | None = None) -> dict:
    """Median seconds per call of each op: ops take turns for ``rounds`` rounds (so noise hits all alike).

    ``warm``: ``{op key: calls}`` made first, unmeasured (see :func:`warm_calls`).
    """
    for key, calls in (warm or {}).items():
        for _ in range(calls):
            ops[key]()
    per_round: dict = {key: [] for key in ops}
    for r in range(rounds):
        for key, fn in ops.items():
            times = time_op(fn, warmup=2 if r == 0 else 1, min_repeats=3, max_repeats=200, min_seconds=seconds)
            per_round[key].append(median(times))
    return {key: median(values) for key, values in per_round.items()}


def _concurrent(targets: dict, shapes, num_clients: int, calls: int, rounds: int, warmup: int,
                placement: list[dict] | None = None, warm_pushes: int = 0) -> dict:
    """Wall seconds per round, per (target key, op), for ``num_clients`` actors to push (or pull) ``calls``
    times each. First each client pushes ``warm_pushes`` times (object-store pages, see :func:`warm_calls`),
    then ``warmup`` whole rounds (first calls); targets take turns, unmeasured.
    ``placement``: Ray resources of client ``i`` (cycled), e.g. one client host each."""
    placement = placement or [{}]
    clients = {key: [ray.remote(_Client).options(num_cpus=0.01, resources=placement[i % len(placement)])
                     .remote(target, shapes, i) for i in range(num_clients)]
               for key, target in targets.items()}
    try:
        for group in clients.values():
            ray.get([c.push.remote(warm_pushes) for c in group])
        walls: dict = {(key, op): [] for key in targets for op in ("push", "pull")}
        for r in range(warmup + rounds):
            for (key, op), times in walls.items():
                t0 = time.perf_counter()
                ray.get([getattr(c, op).remote(calls) for c in clients[key]])
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
        return walls
    finally:
        for group in clients.values():
            for c in group:
                ray.kill(c)


def measure_workload(name, shapes, args, rows, loads) -> None:
    """Append rows for one workload: baseline, floors and shardps at every shard count, interleaved."""
    values = arrays(shapes, scale=1e-3)
    nbytes = sum(v.nbytes for v in values.values())
    keys, vals = list(values), list(values.values())
    placed = {"num_cpus": 0.01, "resources": args.server_resources}  # where servers may live
    for n, opt_name in enumerate(args.optimizers):
        with contextlib.ExitStack() as stack:
            ops, concurrent, meta = {}, {}, {}
            if n == 0:  # the baseline and the byte floors do not depend on the optimizer
                server = ray.remote(BaselineServer).options(**placed).remote(keys, vals)
                sink = ray.remote(_Sink).options(**placed).remote()
                stack.callback(ray.kill, server)
                stack.callback(ray.kill, sink)
                ops.update({("baseline", 1, op): fn for op, fn in _ops_baseline(server, values).items()})
                ops[("floor", 1, "put+get")] = lambda: ray.get(ray.put(vals))
                ops[("floor", 1, "send")] = lambda: ray.get(sink.take.remote(*vals))
                concurrent["baseline", 1] = server
            stores = {}
            for num_shards in args.shards:
                ps = stack.enter_context(shardps.launch(num_shards, optimizer=OPTIMIZERS[opt_name](),
                                                        block_bytes=args.block_bytes,
                                                        shard_resources=args.server_resources))
                ps.register(values)
                stores[num_shards] = ps
                involved = [ps.shards[s] for s in shards_involved(ps, values)]
                meta[num_shards] = len(involved)
                ops[("floor", len(involved), "fanout")] = lambda inv=involved: ray.get([a.ping.remote() for a in inv])
                # the same calls carrying one small argument and answering one: Ray's cost of any payload
                ops[("floor", len(involved), "fanout+arg")] = \
                    lambda inv=involved: ray.get([a.ping_back.remote(_SMALL) for a in inv])
                ops.update({("shardps", num_shards, op): fn for op, fn in _ops_shardps(ps, values).items()})
                concurrent["shardps", num_shards] = ps
            if n == 0 and 1 in args.shards:  # what the NaN/Inf check costs: the same store without it
                ps = stack.enter_context(shardps.launch(1, optimizer=OPTIMIZERS[opt_name](), allow_nonfinite=True,
                                                        block_bytes=args.block_bytes,
                                                        shard_resources=args.server_resources))
                ps.register(values)
                meta["unchecked"] = 1
                ops.update({("shardps-unchecked", 1, op): fn for op, fn in _ops_shardps(ps, values).items()
                            if op in ("push", "pull")})
                concurrent["shardps-unchecked", 1] = ps
            warm = {key: warm_calls(local_store_mb(args), nbytes, meta[shards] if system == "shardps" else 1)
                    for key in ops for system, shards, op in [key] if op in ("push", "send")}
            for (system, shards, op), seconds in _interleaved(ops, args.repeats, args.min_seconds, warm).items():
                extra = {"involved": meta[shards]} if system == "shardps" else {}
                optimizer = {"baseline": "add", "floor": "-"}.get(system, opt_name)
                moved = 0 if op.startswith("fanout") else nbytes
                rows.append(_row(name, optimizer, system, shards, 1, op, moved, seconds, **extra))
            if args.clients > 1 and name in args.client_workloads:
                moved = nbytes * args.clients * args.client_pushes
                for ((system, shards), op), walls in _concurrent(concurrent, shapes, args.clients, args.client_pushes,
                                                                 args.client_rounds, args.client_warmup,
                                                                 args.client_resources,
                                                                 warm_calls(local_store_mb(args), nbytes)).items():
                    rows.append(_row(name, "add" if system == "baseline" else opt_name, system, shards, args.clients,
                                     op, moved, median(walls), min_mb_s=moved / max(walls) / 1e6,
                                     max_mb_s=moved / min(walls) / 1e6, rounds=len(walls)))
            for num_shards, ps in stores.items():
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
        if r["system"].startswith("shardps") and ref:
            r["vs_baseline"] = r["mb_s"] / ref


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's must-show figures, each with its measured value and verdict."""
    def get(**match):
        found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
        return found[0] if found else None

    results = []
    for r in rows:
        if r["system"].startswith("shardps") and r["shards"] == 1 and r["clients"] == 1 \
                and r["optimizer"] == "add" and r["op"] in ("push", "pull"):
            label = " (NaN/Inf check off)" if r["system"] == "shardps-unchecked" else ""
            results.append({"target": f"1 shard vs baseline, {r['workload']} {r['op']}{label} >= 0.95",
                            "value": r.get("vs_baseline"), "ok": (r.get("vs_baseline") or 0) >= 0.95})
    for r in rows:
        if r["workload"] == "tiny" and r["system"] == "shardps" and r["optimizer"] == "add" and r["clients"] == 1 \
                and r["op"] in ("push_pull", "push+pull"):
            calls = 2 if r["op"] == "push+pull" else 1
            for floor_op in ("fanout", "fanout+arg"):
                floor = get(workload="tiny", system="floor", op=floor_op, shards=r["involved"])
                if floor:
                    ratio = r["median_s"] / (floor["median_s"] * calls)
                    results.append({"target": f"tiny {r['op']} latency, {r['shards']} shards <= 1.2x {floor_op} "
                                              f"floor ({calls} fan-out{'s' if calls > 1 else ''})",
                                    "value": ratio, "ok": ratio <= 1.2})
    one = get(workload="big", optimizer="adam", system="shardps", shards=1, op="push", clients=1)
    two = get(workload="big", optimizer="adam", system="shardps", shards=2, op="push", clients=1)
    if one and two:
        ratio = two["mb_s"] / one["mb_s"]
        results.append({"target": "Adam 100 MB push: 2 shards >= 1.6x 1 shard", "value": ratio, "ok": ratio >= 1.6})
    for r in rows:
        if r["clients"] > 1 and r["system"].startswith("shardps") and r["shards"] == 1 and r["optimizer"] == "add" \
                and r.get("vs_baseline"):
            label = " (NaN/Inf check off)" if r["system"] == "shardps-unchecked" else ""
            results.append({"target": f"{r['clients']} clients, {r['workload']} {r['op']}{label}: "
                                      "1 shard >= 0.9x baseline",
                            "value": r["vs_baseline"], "ok": r["vs_baseline"] >= 0.9})
    many = [r for r in rows if r["workload"] == "model10x100k" and r["clients"] > 1 and r["system"] == "shardps"
            and r["shards"] == 2 and r["optimizer"] == "add" and r["op"] == "push"]
    if many and many[0].get("vs_baseline"):
        results.append({"target": f"{many[0]['clients']} clients, 10x100k push: 2 shards >= 1.5x baseline",
                        "value": many[0]["vs_baseline"], "ok": many[0]["vs_baseline"] >= 1.5})
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardps bench ps", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--workloads", nargs="+", default=list(workloads()), choices=list(workloads()))
    p.add_argument("--optimizers", nargs="+", default=["add", "adam"], choices=list(OPTIMIZERS))
    p.add_argument("--clients", type=int, default=4, help="concurrent client actors (1: skip)")
    p.add_argument("--client-workloads", nargs="+", default=["model10x100k", "cnn"],
                   help="workloads also measured with concurrent clients")
    p.add_argument("--client-pushes", type=int, default=5, help="pushes (or pulls) per client per round")
    p.add_argument("--client-rounds", type=int, default=15, help="measured rounds with concurrent clients")
    p.add_argument("--client-warmup", type=int, default=3, help="unmeasured rounds first")
    p.add_argument("--client-resources", type=json.loads, default=None,
                   help='JSON list of Ray resources, client i gets entry i (cycled), e.g. \'[{"host1": 0.01}]\'')
    p.add_argument("--repeats", type=int, default=5, help="rounds; every configuration is timed once per round")
    p.add_argument("--min-seconds", type=float, default=0.3, help="minimum seconds per configuration per round")
    p.add_argument("--scale", type=float, default=1.0, help="shrink tensor sizes (smoke tests)")
    p.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    add_cluster_args(p, "shards and the baseline")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if min(args.shards) < 1 or args.repeats < 1 or args.scale <= 0 or args.clients < 1:
        p.error("--shards, --repeats, --clients must be >= 1 and --scale > 0")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    started = connect(args)
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
