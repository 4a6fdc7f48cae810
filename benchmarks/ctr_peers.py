"""CTR training against what a user would run instead: one-process Keras and TensorFlow's parameter server.

    python -m benchmarks.ctr_peers --out bench-out/ctr-peers              # batch 256 and 2048, 2 rounds
    python -m benchmarks.ctr_peers --batch 256 --rounds 1 --num-train 20000 --peers keras shardps-async-1

The same wide & deep model (8 fields, dim-16 embeddings + a wide weight per
id, MLP 64-32-1, Adam 0.002 for the dense part, Adagrad 0.05 on the rows of
the batch's de-duplicated ids; accuracy, logloss and AUC computed on every
training batch, as the built-in model does) trained for one epoch over the
``ctr`` dataset's synthetic clicks by:

- ``keras``: one process, Keras 3 ``fit`` (``steps_per_execution``), its
  tables updated by TensorFlow's sparse Adagrad kernel
  (``ResourceSparseApplyAdagradV2``) on the batch's unique ids: a shardps
  table's rule. TensorFlow's default threads (both cores).
- ``pss-1``, ``pss-2``: ``tf.distribute.ParameterServerStrategy`` with an
  in-process cluster of 2 workers and 1 or 2 ps tasks, the tables
  partitioned over the ps tasks as TensorFlow's tutorial does, each worker
  reading its own half of the data; Keras 2 (``tf_keras``, whose ``fit``
  drives the ClusterCoordinator; Keras 3's cannot) with its sparse Adagrad
  (the same kernel after de-duplicating ids).
- ``shardps-sync-S``, ``shardps-async-S``: ``shardps.train``, 2 workers, S shards.
- ``keras-bare``, ``pss-1-bare``: the same without metrics, the fastest those
  two go (TensorFlow's parameter server halves its speed computing them).

Each run is a child process of its own (an in-process TensorFlow cluster
cannot be shut down); configurations take turns round after round.
Reported per configuration, medians over rounds: examples/s over the
training wall (TensorFlow's tracing inside ``fit`` included; shardps's
``samples_per_s``, which starts after its workers traced their step),
end-to-end seconds of the call (Ray start, shards and workers included for
shardps), test AUC and logloss (exact, on the 20,000 held-out clicks) and
ratios to the ``keras`` and ``pss-1`` rows of the same batch size.
Needs ``pip install tf-keras`` for the ``pss`` rows (``.[bench]``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import median, print_table, write_rows

FIELDS, DENSE, VOCAB, DIM = 8, 4, 100_000, 16  # the ctr dataset's defaults
DENSE_LR, TABLE_LR, EPS = 0.002, 0.05, 1e-7
PEERS = ("keras", "keras-bare", "pss-1", "pss-1-bare", "pss-2", "shardps-sync-1", "shardps-sync-2", "shardps-sync-4",
         "shardps-async-1", "shardps-async-2", "shardps-async-4")


def _data(num_train: int):
    from shardps.training import ctr

    x, y, x_test, y_test, _ = ctr.generate(num_train=num_train)
    return {"ids": x["ids"], "dense": x["dense"]}, y, {"ids": x_test["ids"], "dense": x_test["dense"]}, y_test


def _scores(logits: np.ndarray, y: np.ndarray) -> dict:
    from shardps.training import ctr

    p = ctr.sigmoid(logits.astype(np.float64).reshape(-1))
    return {"test_auc": ctr.auc(y, p), "test_logloss": ctr.logloss(y, p)}


def _layers(k, tf):
    """The wide & deep graph in Keras module ``k`` (Keras 3 or tf_keras): ``(inputs, logit, tables)``."""
    ids = k.Input((FIELDS,), dtype="int64", name="ids")
    dense = k.Input((DENSE,), name="dense")
    emb = k.layers.Embedding(FIELDS * VOCAB, DIM, embeddings_initializer=k.initializers.RandomUniform(-0.05, 0.05),
                             name="emb")
    wide = k.layers.Embedding(FIELDS * VOCAB, 1, embeddings_initializer="zeros", name="wide")
    h = k.layers.Concatenate()([k.layers.Flatten()(emb(ids)), dense])
    h = k.layers.Dense(64, activation="relu", name="deep1")(h)
    h = k.layers.Dense(32, activation="relu", name="deep2")(h)
    wide_sum = k.layers.Flatten()(k.layers.Lambda(lambda t: tf.reduce_sum(t, axis=1))(wide(ids)))
    logit = k.layers.Add()([k.layers.Dense(1, name="deep_out")(h), wide_sum])
    return {"ids": ids, "dense": dense}, k.layers.Lambda(lambda t: tf.squeeze(t, -1))(logit), (emb, wide)


def _metrics(k) -> list:
    """The built-in widedeep's compiled metrics (shardps computes them on every training batch): the peers too."""
    return [k.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
            k.metrics.BinaryCrossentropy(from_logits=True, name="logloss"),
            k.metrics.AUC(num_thresholds=1000, from_logits=True, name="auc")]


def _keras(args, x, y, x_test, y_test) -> dict:
    """One process, Keras 3: TensorFlow's sparse Adagrad on the tables, Adam on the rest."""
    import keras
    import tensorflow as tf

    class WideDeep(keras.Model):
        def train_step(self, data):
            x, y = data
            tables = [layer.embeddings for layer in self.tables]
            dense = [v for v in self.trainable_variables if all(v is not t for t in tables)]
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            grads = tape.gradient(loss, dense + [t.value for t in tables])
            self.optimizer.apply(grads[:len(dense)], dense)
            for table, accumulator, grad in zip(tables, self.accumulators, grads[len(dense):]):
                unique, position = tf.unique(grad.indices)  # the batch's ids, each once: summed gradients
                rows = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique)[0])
                tf.raw_ops.ResourceSparseApplyAdagradV2(var=table.value.handle, accum=accumulator.handle, lr=TABLE_LR,
                                                        epsilon=EPS, grad=rows, indices=unique)
            return self.compute_metrics(x, y, y_pred)

    keras.utils.set_random_seed(args.seed)
    inputs, logit, tables = _layers(keras, tf)
    model = WideDeep(inputs, logit)
    model.tables = tables
    model.accumulators = [tf.Variable(tf.zeros(t.embeddings.shape), trainable=False) for t in tables]
    model.compile(optimizer=keras.optimizers.Adam(DENSE_LR), loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=_metrics(keras) if args.metrics else None, steps_per_execution=args.steps_per_execution)
    start = time.perf_counter()
    model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=True, verbose=0)
    wall = time.perf_counter() - start
    logits = model.predict(x_test, batch_size=4096, verbose=0)
    return {"examples_per_s": len(y) / wall, "train_s": wall, "total_s": wall, **_scores(logits, y_test)}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _pss(args, num_ps: int, x, y, x_test, y_test) -> dict:
    """TensorFlow's ParameterServerStrategy, in-process cluster (2 workers, ``num_ps`` ps), tf_keras ``fit``."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import tf_keras as k

    start_all = time.perf_counter()
    workers = 2
    ports = _free_ports(workers + num_ps)
    spec = tf.train.ClusterSpec({"worker": [f"localhost:{p}" for p in ports[:workers]],
                                 "ps": [f"localhost:{p}" for p in ports[workers:]]})
    config = tf.compat.v1.ConfigProto(inter_op_parallelism_threads=workers + 1)  # as TensorFlow's tutorial
    for i in range(workers):
        tf.distribute.Server(spec, job_name="worker", task_index=i, config=config, protocol="grpc")
    for i in range(num_ps):
        tf.distribute.Server(spec, job_name="ps", task_index=i, protocol="grpc")
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(spec, rpc_layer="grpc")
    partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(min_shard_bytes=256 << 10,
                                                                            max_shards=num_ps)
    strategy = tf.distribute.ParameterServerStrategy(resolver, variable_partitioner=partitioner)

    class WideDeep(k.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
            variables = self.trainable_variables
            grads = tape.gradient(loss, variables)
            rows = [(g, v) for g, v in zip(grads, variables) if isinstance(g, tf.IndexedSlices)]
            self.row_optimizer.apply_gradients(rows)  # de-duplicates ids, then the sparse kernel
            self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables)
                                            if not isinstance(g, tf.IndexedSlices)])
            return self.compute_metrics(x, y, y_pred, None)

    k.utils.set_random_seed(args.seed)
    with strategy.scope():
        inputs, logit, _ = _layers(k, tf)
        model = WideDeep(inputs, logit)
        model.row_optimizer = k.optimizers.legacy.Adagrad(TABLE_LR, initial_accumulator_value=0.0, epsilon=EPS)
        model.compile(optimizer=k.optimizers.legacy.Adam(DENSE_LR),
                      loss=k.losses.BinaryCrossentropy(from_logits=True), metrics=_metrics(k) if args.metrics else None,
                      steps_per_execution=args.steps_per_execution)
        tickets = tf.Variable(0, dtype=tf.int64)  # on a ps: hands each worker's dataset its own half

    features, labels = (x["ids"], x["dense"]), y

    def dataset_fn(_context):
        part = tickets.assign_add(1) - 1  # every worker is told "pipeline 0 of 1": count them instead
        data = tf.data.Dataset.from_tensor_slices(({"ids": features[0], "dense": features[1]}, labels))
        data = data.shard(workers, part % workers).shuffle(20_000, seed=args.seed)
        return data.batch(args.batch, drop_remainder=True).repeat().prefetch(2)

    steps = len(y) // args.batch
    start = time.perf_counter()
    model.fit(k.utils.experimental.DatasetCreator(dataset_fn), epochs=1, steps_per_epoch=steps, verbose=0)
    wall = time.perf_counter() - start
    logits = np.concatenate([model({"ids": x_test["ids"][i:i + 4096], "dense": x_test["dense"][i:i + 4096]},
                                   training=False).numpy() for i in range(0, len(y_test), 4096)])
    return {"examples_per_s": steps * args.batch / wall, "train_s": wall, "total_s": time.perf_counter() - start_all,
            **_scores(logits, y_test)}


def _shardps(args, mode: str, shards: int) -> dict:
    import functools

    from shardps.training import ctr
    from shardps.training.config import TrainConfig
    from shardps.training.run import train

    ctr.generate = functools.partial(ctr.generate, num_train=args.num_train)
    config = TrainConfig(model="widedeep", mode=mode, num_shards=shards, num_workers=2, batch_size=args.batch,
                         num_cpus=2, seed=args.seed, eval_every=10**9)
    start = time.perf_counter()
    history = train(config)
    summary = history.summary()
    return {"examples_per_s": summary["samples_per_s"], "train_s": summary["wall_s"],
            "total_s": time.perf_counter() - start, "test_auc": summary["test_auc"],
            "test_logloss": summary["test_logloss"], "ms_per_step": summary["ms_per_step"]}


def run_one(args) -> dict:
    """One configuration in this process: ``args.peer`` at ``args.batch``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    x, y, x_test, y_test = _data(args.num_train)
    args.metrics = not args.peer.endswith("-bare")
    if args.peer.startswith("keras"):
        return _keras(args, x, y, x_test, y_test)
    if args.peer.startswith("pss-"):
        return _pss(args, int(args.peer.split("-")[1]), x, y, x_test, y_test)
    _, mode, shards = args.peer.split("-")
    return _shardps(args, mode, int(shards))


def _child(peer: str, batch: int, args) -> dict:
    """Run one configuration in a fresh Python process; its result (raises with its stderr on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.ctr_peers", "--child", peer, "--batch", str(batch),
           "--num-train", str(args.num_train), "--steps-per-execution", str(args.steps_per_execution),
           "--seed", str(args.seed)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{peer} at batch {batch} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="shardps bench ctr-peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", nargs="+", default=list(PEERS), help=f"of {', '.join(PEERS)}")
    p.add_argument("--batch", type=int, nargs="+", default=[256, 2048], help="examples per worker step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-train", type=int, default=300_000)
    p.add_argument("--steps-per-execution", type=int, default=20, help="Keras fit's, for keras and pss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("bench-out/ctr-peers"))
    args = p.parse_args(argv)
    if args.child:
        args.peer, args.batch = args.child, args.batch[0]
        print(json.dumps(run_one(args)), flush=True)
        return []
    unknown = sorted(set(args.peers) - set(PEERS))
    if unknown:
        p.error(f"unknown peers {unknown}: choose from {', '.join(PEERS)}")
    runs: dict[tuple, list] = {}
    for r in range(args.rounds):
        for batch in args.batch:
            for peer in args.peers:
                result = _child(peer, batch, args)
                runs.setdefault((peer, batch), []).append(result)
                print(f"  round {r + 1}/{args.rounds} batch {batch} {peer}: {result['examples_per_s']:.0f} examples/s, "
                      f"AUC {result['test_auc']:.4f}", flush=True)
    rows = _rows(runs)
    write_rows(args.out, "ctr_peers", rows)
    print_table(rows, ["peer", "batch", "examples_per_s", "vs_keras", "vs_keras_bare", "vs_pss_1", "vs_pss_1_bare",
                       "test_auc", "test_logloss", "total_s"])
    return rows


def _rows(runs: dict) -> list[dict]:
    """One row per (peer, batch): medians over rounds, and ratios to that batch's keras and pss-1 rows
    (with and without metrics)."""
    rows = []
    for (peer, batch), results in runs.items():
        row = {"peer": peer, "batch": batch, "rounds": len(results),
               **{k: median([r[k] for r in results]) for k in ("examples_per_s", "train_s", "total_s", "test_auc",
                                                                "test_logloss")},
               "min": min(r["examples_per_s"] for r in results), "max": max(r["examples_per_s"] for r in results)}
        if "ms_per_step" in results[0]:
            row.update({f"ms_{k}": median([r["ms_per_step"].get(k, 0.0) for r in results])
                        for k in results[0]["ms_per_step"]})
        rows.append(row)
    for row in rows:
        for ref in ("keras", "keras-bare", "pss-1", "pss-1-bare"):
            base = [r["examples_per_s"] for r in rows if r["peer"] == ref and r["batch"] == row["batch"]]
            if base:
                row[f"vs_{ref.replace('-', '_')}"] = row["examples_per_s"] / base[0]
    return rows


if __name__ == "__main__":
    main()
