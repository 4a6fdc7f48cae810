"""``shardps bench {ps,training,cluster} [flags]``: forwards to the benchmark scripts."""
from __future__ import annotations

import argparse

_SCRIPTS = {
    "ps": ("benchmarks.ps_throughput", "parameter-server throughput vs shard count, with baseline and Ray floor"),
    "training": ("benchmarks.training_throughput", "training samples/s and time-to-accuracy per mode and shards"),
    "cluster": ("benchmarks.emulated_cluster", "the ps sweep on an emulated multi-host cluster (root)"),
    "cpu": ("benchmarks.cpu_accounting", "CPU per push by process kind, for concurrent clients"),
    "profile": ("benchmarks.profile_push", "where one push spends its time, client and shard"),
    "replication": ("benchmarks.replication", "push/pull cost of replicas=2 vs none"),
    "ctr": ("benchmarks.ctr_throughput", "widedeep CTR training examples/s vs shards and vs one process"),
    "tables": ("benchmarks.tables", "embedding tables: rows/s vs shards, dict-actor and numpy baselines, bytes/row"),
}


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (see benchmarks/)", add_help=True)
    p.add_argument("which", choices=sorted(_SCRIPTS), help="; ".join(f"{k}: {v[1]}" for k, v in _SCRIPTS.items()))
    p.add_argument("args", nargs=argparse.REMAINDER, help="flags for the benchmark (--help lists them)")
    p.set_defaults(run=_run, parser=p)


def _run(args, parser) -> int:
    import importlib

    importlib.import_module(_SCRIPTS[args.which][0]).main(args.args)
    return 0
