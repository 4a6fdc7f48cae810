"""Training the built-in wide & deep model on a Criteo-format file: examples/s at 1, 2 and 4 shards.

    python -m benchmarks.criteo_training --rows 1000000 --steps 300 --rounds 2 --out bench-out/criteo-training

The file is generated (:func:`benchmarks.criteo_read.generate`: 26 Zipf-like
categorical fields, 13 integers, 5 % missing), read by ``--dataset criteo``
(Ray Data, into the object store) and trained in each mode and shard count,
the configurations taking turns round after round. Examples/s over the whole
training (the trainers' ``samples_per_s``, reading not included), medians
over rounds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import median, print_table, write_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=300, help="steps per worker and run")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["sync", "async"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/criteo-training"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # workers inherit it: no TensorFlow start-up chatter
    import ray

    from benchmarks.criteo_read import generate
    from shardps.store.cluster import start_ray
    from shardps.training.config import TrainConfig
    from shardps.training.run import train

    results: dict[tuple, list] = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clicks.txt"
        generate(path, args.rows)
        started = start_ray(num_cpus=args.num_cpus)
        try:
            for round_ in range(args.rounds):
                for mode in args.modes:
                    for shards in args.shards:
                        config = TrainConfig(model="widedeep", dataset="criteo", data_dir=str(path), mode=mode,
                                             num_shards=shards, steps=args.steps, eval_every=10**9)
                        summary = train(config).summary()
                        results.setdefault((mode, shards), []).append(summary)
                        print(f"  round {round_ + 1}: {mode} {shards} shards {summary['samples_per_s']:.0f}/s",
                              flush=True)
        finally:
            if started:
                ray.shutdown()
    rows = [{"mode": mode, "shards": shards, "rows": args.rows, "steps_per_worker": args.steps,
             "examples_per_s": median([s["samples_per_s"] for s in runs]),
             "test_logloss": median([s["test_logloss"] for s in runs]),
             "test_auc": median([s["test_auc"] for s in runs]), "table_rows": runs[-1]["table_rows"]}
            for (mode, shards), runs in results.items()]
    print_table(rows, ["mode", "shards", "examples_per_s", "test_logloss", "test_auc", "table_rows"])
    write_rows(args.out, "criteo_training", rows)


if __name__ == "__main__":
    main()
