"""``python -m benchmarks.cli WHICH [flags]`` (or ``shardps bench WHICH [flags]``): runs one benchmark script."""
from __future__ import annotations

import argparse
import importlib
import sys

_SCRIPTS = {
    "ps": ("benchmarks.ps_throughput", "parameter-server throughput vs shard count, with baseline and Ray floor"),
    "training": ("benchmarks.training_throughput", "training samples/s and time-to-accuracy per mode and shards"),
    "cluster": ("benchmarks.emulated_cluster", "the ps sweep on an emulated multi-host cluster (root)"),
    "cpu": ("benchmarks.cpu_accounting", "CPU per push by process kind, for concurrent clients"),
    "profile": ("benchmarks.profile_push", "where one push spends its time, client and shard"),
    "replication": ("benchmarks.replication", "push/pull cost of replicas=2 vs none"),
    "ctr": ("benchmarks.ctr_throughput", "widedeep CTR training examples/s vs shards and vs one process"),
    "ctr-peers": ("benchmarks.ctr_peers", "widedeep CTR training vs one-process Keras and ParameterServerStrategy"),
    "criteo": ("benchmarks.criteo_read", "reading Criteo-format logs: rows/s vs pandas + a Python id loop"),
    "criteo-training": ("benchmarks.criteo_training", "widedeep on a Criteo-format file: examples/s vs shards"),
    "tables": ("benchmarks.tables", "embedding tables: rows/s vs shards, dict-actor and numpy baselines, bytes/row"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardps bench", description="Run one benchmark script (see benchmarks/).")
    parser.add_argument("which", choices=sorted(_SCRIPTS), help="; ".join(f"{k}: {v[1]}" for k, v in _SCRIPTS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="flags for the benchmark (--help lists them)")
    args = parser.parse_args(argv)
    importlib.import_module(_SCRIPTS[args.which][0]).main(args.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
