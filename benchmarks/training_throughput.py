"""Training throughput: samples/s and time-to-accuracy per mode and shard count.

Two references, in the same run: what a user would run instead, the same
Keras model trained with ``model.fit`` in one process on all cores (same
batch size, learning rate and data); and the same model code shardps
workers run (one TensorFlow thread, a numpy update per step) in one process.
Each round runs every reference and configuration once, in turn (the
machine's load drifts); figures are medians over rounds, with min and max
of samples/s beside them, plus the mean time per worker step in each phase.

    python -m benchmarks.training_throughput --out bench-out
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import time
from pathlib import Path

from typing import Callable

from benchmarks.common import median, print_table, write_rows


def _single_process(dataset, model_name: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """The reference: one process, no parameter server, no Ray."""
    from shardps.training.data import load
    from shardps.training.feed import Batches, Examples
    from shardps.training.models import builtin
    from shardps.training.replica import Replica

    data = load(dataset, seed=seed)
    model = Replica(functools.partial(getattr(builtin, model_name), data.input_shape, data.num_classes), seed=seed)
    batches = Batches(data.x_train, data.y_train, batch_size, seed=seed)
    weights = model.get_weights()
    test = Examples(data.x_test, data.y_test)

    def accuracy() -> float:
        return model.evaluate(test.chunks(len(test)), lambda needed: weights)["accuracy"]

    model.compute_gradients(*next(batches))  # warm-up: build the loss and metrics
    model.compute_gradients(*next(batches))  # and trace the tf.function
    start, reached = time.perf_counter(), None
    for step in range(1, steps + 1):
        model.set_weights(weights)
        grads, _, _ = model.compute_gradients(*next(batches))
        weights = {k: w - lr * grads[k] for k, w in weights.items()}
        if reached is None and step % 10 == 0 and accuracy() >= 0.95:
            reached = time.perf_counter() - start
    wall = time.perf_counter() - start
    return {"samples_per_s": steps * batch_size / wall, "wall_s": wall, "time_to_95": reached,
            "accuracy": accuracy()}


_KERAS_FIT = """
import json, sys, time
import keras
from shardps.training.data import load
from shardps.training.models import builtin
dataset, model_name, samples, batch_size, lr, seed = sys.argv[1:]
data = load(dataset, seed=int(seed))
keras.utils.set_random_seed(int(seed))
net = getattr(builtin, model_name)(data.input_shape, data.num_classes)
net.compile(optimizer=keras.optimizers.SGD(float(lr)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
steps = max(1, int(samples) // int(batch_size))
net.fit(data.x_train, data.y_train, batch_size=int(batch_size), epochs=1, steps_per_epoch=min(steps, 10), verbose=0)
start = time.perf_counter()
done = 0
while done < steps:  # fit() stops at the end of the data: go round as the workers' batches do
    chunk = min(steps - done, len(data.x_train) // int(batch_size))
    net.fit(data.x_train, data.y_train, batch_size=int(batch_size), epochs=1, steps_per_epoch=chunk, verbose=0)
    done += chunk
wall = time.perf_counter() - start
accuracy = net.evaluate(data.x_test, data.y_test, verbose=0)[1]
print(json.dumps({"samples_per_s": steps * int(batch_size) / wall, "wall_s": wall, "accuracy": accuracy}))
"""


def _keras_fit(dataset, model_name: str, steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """The reference a user would pick: ``model.fit`` in a fresh process (TensorFlow on all cores)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _KERAS_FIT, dataset, model_name, str(steps * batch_size),
                          str(batch_size), str(lr), str(seed)], check=True, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "time_to_95": None}


def _shardps(mode: str, shards: int, dataset: str, steps: int, args) -> dict:
    """One training run; its samples/s, time to 95 % test accuracy and where a worker step's time went."""
    from shardps.training.config import TrainConfig
    from shardps.training.run import train

    # evaluations run on the driver, beside the workers: only where time to accuracy is measured
    eval_every = 10 if dataset == "digits" else steps
    config = TrainConfig(mode=mode, num_shards=shards, num_workers=args.workers, steps=steps,
                         batch_size=args.batch_size, lr=args.lr, model=args.model, dataset=dataset,
                         eval_every=eval_every, seed=args.seed)
    history = train(config)
    reached = next((p.wall_s for p in history.points if p.accuracy >= 0.95), None)
    return {"samples_per_s": history.samples_per_s, "wall_s": history.wall_s, "time_to_95": reached,
            "accuracy": history.final_accuracy, **{f"ms_{k}": v for k, v in history.ms_per_step.items()}}


def _runs(dataset: str, steps: int, args) -> list[tuple[tuple, Callable[[], dict]]]:
    """``((mode, shards), run)`` for the references and every mode and shard count."""
    total = steps * args.workers
    runs = [(("keras-fit", 0), lambda: _keras_fit(dataset, args.model, total, args.batch_size, args.lr, args.seed)),
            (("single-process", 0),
             lambda: _single_process(dataset, args.model, total, args.batch_size, args.lr, args.seed))]
    for mode in args.modes:
        for shards in args.shards:
            runs.append(((mode, shards), lambda m=mode, s=shards: _shardps(m, s, dataset, steps, args)))
    return runs


def _median_row(dataset: str, mode: str, shards: int, results: list[dict], workers: int) -> dict:
    """Medians over rounds of every figure (None where a round had none), min/max of samples/s."""
    speeds = [r["samples_per_s"] for r in results]
    row = {"dataset": dataset, "mode": mode, "shards": shards, "workers": workers if shards else 1,
           "rounds": len(results), "min_samples_per_s": min(speeds), "max_samples_per_s": max(speeds)}
    for key in results[0]:
        values = [r[key] for r in results if r.get(key) is not None]
        row[key] = median(values) if values else None
    return row


def run(args) -> list[dict]:
    """Per dataset, ``args.rounds`` rounds; in each, every reference and configuration runs once, in turn."""
    import ray

    from shardps.store.cluster import start_ray

    rows = []
    for dataset, steps in [(d, args.steps if d == "synthetic" else args.digits_steps) for d in args.datasets]:
        runs = _runs(dataset, steps, args)
        results: dict[tuple, list[dict]] = {name: [] for name, _ in runs}
        started = start_ray(num_cpus=args.num_cpus,
                            object_store_bytes=args.object_store_mb * 10**6 if args.object_store_mb else None)
        try:
            for round_ in range(args.rounds):
                for (mode, shards), run_once in runs:
                    results[(mode, shards)].append(run_once())
                    print(f"  round {round_ + 1}/{args.rounds} {dataset} {mode} {shards or ''}: "
                          f"{results[(mode, shards)][-1]['samples_per_s']:.0f} samples/s", flush=True)
        finally:
            if started:
                ray.shutdown()
        rows += [_median_row(dataset, mode, shards, res, args.workers) for (mode, shards), res in results.items()]
    for row in rows:
        same = {r["mode"]: r["samples_per_s"] for r in rows if r["dataset"] == row["dataset"] and not r["shards"]}
        row["vs_keras_fit"] = row["samples_per_s"] / same["keras-fit"]
        row["vs_single_process"] = row["samples_per_s"] / same["single-process"]
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardps bench training", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["sync", "async", "ssp"])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--datasets", nargs="+", default=["synthetic", "digits"], choices=["synthetic", "digits"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200, help="steps per worker on synthetic MNIST-shaped data")
    p.add_argument("--digits-steps", type=int, default=300, help="steps per worker on digits")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--model", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians over them")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--object-store-mb", type=int, default=None,
                   help="object store of the local Ray, MB (default: Ray's, 30 %% of memory); a small one is warm "
                        "after fewer steps (see benchmarks/README.md, Warm object store)")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # TensorFlow warns of "retracing" once tf.functions of the same method were traced 5 times in this
    # process: here every run builds its own model, each traced once or twice, so the warning means nothing
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    args = parse_args(argv)
    rows = run(args)
    write_rows(args.out, "training_throughput", rows)
    print_table(rows, ["dataset", "mode", "shards", "workers", "samples_per_s", "min_samples_per_s",
                       "max_samples_per_s", "vs_keras_fit", "vs_single_process", "time_to_95", "accuracy"])
    phases = sorted({k for row in rows for k in row if k.startswith("ms_")})
    print("\nwhere a worker step's time went (ms, medians over rounds):")
    print_table([row for row in rows if row["shards"]], ["dataset", "mode", "shards", *phases])
    return rows


if __name__ == "__main__":
    main()
