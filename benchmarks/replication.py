"""What replication costs: push, pull and push_pull with ``replicas=2`` vs without, same shard count.

A replicated push is applied by the shard, sent on to its replica and
applied there before it is acknowledged, so expect about one more round trip
plus one more copy of the message. Pulls are served by the shard alone.
Both stores are up at once and measured round by round, interleaved, so
machine noise hits both alike; medians over rounds of medians. A local Ray's
object store is warmed first (:func:`benchmarks.common.warm_calls`).

    python -m benchmarks.replication --shards 2 --rounds 5
"""
from __future__ import annotations

import argparse
from pathlib import Path

import ray

import shardps
from benchmarks.common import (add_cluster_args, arrays, connect, local_store_mb, median, print_table,
                               shards_involved, time_op, warm_calls, workloads, write_rows)

OPS = ("push", "pull", "push_pull")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="shardps bench replication", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--workloads", nargs="+", default=["tiny", "cnn"], choices=sorted(workloads()))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scale", type=float, default=1.0, help="shrink the workloads (smoke tests)")
    p.add_argument("--num-cpus", type=int, default=2)
    add_cluster_args(p, "shards and replicas")
    p.add_argument("--out", type=Path, help="write replication.csv/json here")
    args = p.parse_args(argv)

    started = connect(args)
    rows = []
    try:
        for name in args.workloads:
            shapes = workloads(args.scale)[name]
            values = arrays(shapes, scale=1e-3)
            stores = {r: shardps.launch(args.shards, optimizer=shardps.SGD(lr=-1.0), replicas=r,
                                        shard_resources=args.server_resources) for r in (1, 2)}
            try:
                for ps in stores.values():
                    ps.register(arrays(shapes))
                    _warm(ps, values, local_store_mb(args))
                ops = {op: {r: _op(ps, op, values) for r, ps in stores.items()} for op in OPS}
                times = {(op, r): [] for op in OPS for r in stores}
                for _ in range(args.rounds):  # interleaved: both configurations see the same noise
                    for op in OPS:
                        for r in stores:
                            times[op, r].append(median(time_op(ops[op][r], min_repeats=5, min_seconds=0.3)))
            finally:
                for ps in stores.values():
                    ps.shutdown()
            for op in OPS:
                plain, mirrored = median(times[op, 1]), median(times[op, 2])
                rows.append({"workload": name, "op": op, "shards": args.shards, "ms": round(1000 * plain, 3),
                             "ms_replicas2": round(1000 * mirrored, 3), "ratio": round(mirrored / plain, 3)})
    finally:
        if started:
            ray.shutdown()
    print_table(rows, ["workload", "op", "shards", "ms", "ms_replicas2", "ratio"])
    if args.out:
        write_rows(args.out, "replication", rows)
    return rows


def _warm(ps, values: dict, store_mb: int | None) -> None:
    """Push until every process involved (client, shards, replicas) is past its object store's page faults."""
    involved = len(shards_involved(ps, values))
    for _ in range(warm_calls(store_mb, sum(v.nbytes for v in values.values()), involved)):
        ps.push(values)


def _op(ps, op: str, values: dict):
    if op == "push":
        return lambda: ps.push(values)
    if op == "pull":
        return lambda: ps.pull()
    return lambda: ps.push_pull(values)


if __name__ == "__main__":
    main()
