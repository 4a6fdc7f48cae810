"""Where one push's time goes: client-side phases and the time spent inside each shard's push.

Shards are the real ParameterShard with a timer around ``push``; the
baseline actor gets the same timer. Client phases are timed directly.

    python -m benchmarks.profile_push --workload big --optimizer add --shards 1 2
"""
from __future__ import annotations

import argparse
import os
import time

import ray

from benchmarks.baseline import BaselineServer
from benchmarks.common import arrays, median, print_table, time_op, workloads
from benchmarks.ps_throughput import OPTIMIZERS
from shardps.store.cluster import start_ray
from shardps.store.placement import HashPartitioner, Layout
from shardps.store.router import Router
from shardps.store.shard.actor import ParameterShard
from shardps.store.wire import all_finite


class _TimedShard(ParameterShard):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = []

    def push(self, packet):
        t0 = time.perf_counter()
        try:
            return super().push(packet)
        finally:
            self.seconds.append(time.perf_counter() - t0)

    def timings(self):
        return self.seconds


class _TimedBaseline(BaselineServer):
    def __init__(self, *args):
        super().__init__(*args)
        self.seconds = []

    def push(self, keys, values):
        t0 = time.perf_counter()
        super().push(keys, values)
        self.seconds.append(time.perf_counter() - t0)

    def timings(self):
        return self.seconds


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="shardps bench profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="big", choices=list(workloads()))
    p.add_argument("--optimizer", default="add", choices=list(OPTIMIZERS))
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    started = start_ray(num_cpus=os.cpu_count())
    values = arrays(workloads()[args.workload], scale=1e-3)
    keys, vals = list(values), list(values.values())
    rows = []
    base = ray.remote(_TimedBaseline).options(num_cpus=0.01).remote(keys, vals)
    wall = median(time_op(lambda: ray.get(base.push.remote(keys, vals)), min_repeats=args.repeats))
    rows.append({"system": "baseline", "push_ms": 1e3 * wall,
                 "in_server_ms": 1e3 * median(ray.get(base.timings.remote()))})
    ray.kill(base)
    for num_shards in args.shards:
        optimizer = OPTIMIZERS[args.optimizer]()
        actors = [ray.remote(_TimedShard).options(num_cpus=0.01).remote(i, optimizer) for i in range(num_shards)]
        ps = Router(actors, Layout(HashPartitioner(num_shards)), optimizer=optimizer,
                    on_shutdown=lambda shards=actors: [ray.kill(a) for a in shards])  # owns them: may register
        ps.register(values)
        wall = median(time_op(lambda: ps.push(values), min_repeats=args.repeats))
        check = median(time_op(lambda: [all_finite(v) for v in vals], min_repeats=args.repeats))
        pack = median(time_op(lambda: ps.pack(values), min_repeats=args.repeats))
        shard_ms = [1e3 * median(t) for t in ray.get([a.timings.remote() for a in actors])]
        rows.append({"system": f"shardps {num_shards} shard(s), {args.optimizer}", "push_ms": 1e3 * wall,
                     "in_server_ms": max(shard_ms), "nan_check_ms": 1e3 * check,
                     "validate_and_pack_ms": 1e3 * pack})
        ps.shutdown()
    print_table(rows, ["system", "push_ms", "in_server_ms", "nan_check_ms", "validate_and_pack_ms"])
    if started:
        ray.shutdown()
    return rows


if __name__ == "__main__":
    main()
