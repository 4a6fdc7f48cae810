"""CTR training throughput: widedeep on the ctr dataset, shardps sync/async vs one process.

The reference is the physical limit for this model: the same TensorFlow
model and batches in one process, its embedding tables plain in-memory
numpy arrays (gather the batch's rows; Adagrad on them; scatter back), the
dense part updated in place with the same Adam -- no Ray, no messages.
Configurations take turns round after round; medians are reported. Also
reported: bytes moved per example (dense keys and the batch's unique rows,
pulled and pushed) against pulling and pushing whole tables every step.

    python -m benchmarks.ctr_throughput --out bench-out/ctr
    python -m benchmarks.ctr_throughput --rounds 1 --steps 5 --shards 1 --num-train 5000   # seconds
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import median, print_table, write_rows


def _one_process(data, config, steps: int) -> dict:
    """The reference loop: ``config.num_workers`` batches per step, like one sync step, in this process."""
    from shardps.store.optim import Adagrad, Adam
    from shardps.training.feed import Batches, as_columns
    from shardps.training.models import model_function
    from shardps.training.replica import Replica

    model = Replica(model_function(config, data.input_shape, 2), seed=config.seed)
    vocab = int(data.x_train["ids"].max()) + 1
    rng = np.random.default_rng(config.seed)
    tables = {name: rng.uniform(-0.05, 0.05, (vocab, spec.dim)).astype(np.float32) if spec.dim > 1
              else np.zeros((vocab, 1), np.float32) for name, spec in model.tables.items()}
    accumulators = {name: np.zeros_like(t) for name, t in tables.items()}
    dense, table_opt, dense_opt = model.get_weights(), Adagrad(lr=config.table_lr), Adam(lr=config.lr)
    dense_state = {k: {s: np.zeros_like(v) for s in dense_opt.slots()} for k, v in dense.items()}
    batches = Batches(as_columns(data.x_train), data.y_train, config.batch_size * config.num_workers, seed=config.seed)

    def step(k: int) -> None:
        x, y = batches.batch(k)
        needed = model.rows_needed(x)
        model.set_weights({**dense, **{n: np.take(tables[n], ids, axis=0) for n, ids in needed.items()}}, needed)
        grads, row_grads, _ = model.compute_gradients(x, y)
        for name, (ids, g) in row_grads.items():
            rows, acc = np.take(tables[name], ids, axis=0), np.take(accumulators[name], ids, axis=0)
            table_opt.apply(rows, g, {"accumulator": acc}, None)
            tables[name][ids], accumulators[name][ids] = rows, acc
        for key, value in dense.items():
            dense_opt.apply(value, grads[key], dense_state[key], k)

    step(0)  # warm-up: build the loss and metrics
    step(1)  # and trace the tf.function
    start = time.perf_counter()
    for k in range(2, steps + 2):
        step(k)
    wall = time.perf_counter() - start
    return {"examples_per_s": steps * config.batch_size * config.num_workers / wall}


def _bytes_per_example(data, config, dims: dict, dense_floats: int) -> dict:
    """Bytes a worker moves per example (pull + push, dense and the batch's unique rows + their ids),
    against pulling and pushing every row of every table."""
    from shardps.training.feed import Batches

    batches = Batches(data.x_train, data.y_train, config.batch_size, seed=1)
    row_bytes = sum(4 * dim + 2 * 8 for dim in dims.values())  # per id: its row in each table, id sent twice
    unique = np.mean([len(np.unique(batches.batch(k)[0]["ids"])) for k in range(20)])
    moved = 2 * (4 * dense_floats + unique * row_bytes)
    vocab_rows = len(np.unique(data.x_train["ids"]))  # rows a full table holds
    whole = 2 * (4 * dense_floats + vocab_rows * sum(4 * dim for dim in dims.values()))
    return {"bytes_per_example": moved / config.batch_size, "whole_tables_bytes_per_example": whole / config.batch_size,
            "unique_ids_per_batch": float(unique)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="shardps bench ctr", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["sync", "async"])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=150, help="steps per worker per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-train", type=int, default=300_000, help="ctr training examples")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/ctr"))
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow loads, here and in the workers

    import ray

    from shardps.training import ctr
    from shardps.store.cluster import start_ray
    from shardps.training.config import TrainConfig
    from shardps.training.data import load
    from shardps.training.run import train

    generate = ctr.generate
    ctr.generate = functools.partial(generate, num_train=args.num_train)
    try:
        data = load("ctr")
        base = TrainConfig(model="widedeep", steps=args.steps, eval_every=10 * args.steps, num_cpus=args.num_cpus)
        runs: dict = {}
        started = start_ray(num_cpus=args.num_cpus)
        try:
            for r in range(args.rounds):
                runs.setdefault(("one process", 0), []).append(_one_process(data, base, args.steps)["examples_per_s"])
                for mode in args.modes:
                    for shards in args.shards:
                        config = dataclasses.replace(base, mode=mode, num_shards=shards)
                        runs.setdefault((mode, shards), []).append(train(config).samples_per_s)
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {s}: {v[-1]:.0f}/s"
                                                                     for (m, s), v in runs.items()), flush=True)
        finally:
            if started:
                ray.shutdown()
    finally:
        ctr.generate = generate
    from shardps.training.models import model_function
    from shardps.training.replica import Replica

    model = Replica(model_function(base, data.input_shape, 2))
    moved = _bytes_per_example(data, base, {n: spec.dim for n, spec in model.tables.items()},
                               sum(v.size for v in model.get_weights().values()))
    reference = median(runs["one process", 0])
    rows = [{"mode": mode, "shards": shards, "examples_per_s": median(v), "min": min(v), "max": max(v),
             "vs_one_process": median(v) / reference, "rounds": len(v), **(moved if shards else {})}
            for (mode, shards), v in runs.items()]
    write_rows(args.out, "ctr_throughput", rows)
    print_table(rows, ["mode", "shards", "examples_per_s", "min", "max", "vs_one_process", "bytes_per_example",
                       "whole_tables_bytes_per_example"])
    return rows


if __name__ == "__main__":
    main()
