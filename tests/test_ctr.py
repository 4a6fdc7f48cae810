"""CTR training on embedding tables: the dataset and its metrics, a sync step against one process, each mode."""
import functools
import itertools
import os
import signal

import numpy as np
import pytest

from shardps.training import ctr
from shardps.training.config import TrainConfig
from shardps.training.data import load
from shardps.store.initializers import Uniform
from shardps.training.run import train


def test_ctr_data_is_deterministic_with_fields_apart_and_an_informative_teacher():
    first = ctr.generate(num_train=3000, num_test=3000, vocab=1000, seed=1)
    again = ctr.generate(num_train=3000, num_test=3000, vocab=1000, seed=1)
    other = ctr.generate(num_train=3000, num_test=3000, vocab=1000, seed=2)
    x, y, _, y_test, reference = first
    np.testing.assert_array_equal(x, again[0])
    assert not np.array_equal(x["ids"], other[0]["ids"])
    assert ((x["ids"] // 1000) == np.arange(8)).all()  # field f owns ids [f * vocab, (f + 1) * vocab)
    assert set(np.unique(y)) == {0.0, 1.0} and 0.1 < y.mean() < 0.5
    assert reference["teacher_auc"] > 0.75 and reference["teacher_logloss"] < ctr.logloss(y_test, np.full(3000, y.mean()))


def test_auc_and_logloss_match_their_definitions():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(np.float32)
    score = np.round(rng.random(300), 1)  # many ties
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(score[y == 1], score[y == 0])]
    assert ctr.auc(y, score) == pytest.approx(np.mean(pairs))
    p = np.clip(score, 0.05, 0.95)
    assert ctr.logloss(y, p) == pytest.approx(-np.mean([np.log(q) if t else np.log(1 - q) for t, q in zip(y, p)]))


_GENERATE = ctr.generate


@pytest.fixture
def small_ctr(monkeypatch):
    """The ctr dataset at test size (the driver makes it and hands the workers their parts)."""
    return lambda **sizes: monkeypatch.setattr(ctr, "generate", functools.partial(_GENERATE, **sizes))


def _plain_widedeep(fields: int, dense_features: int, dim: int, vocab: int):
    """The built-in widedeep written with Keras's own full-vocabulary Embedding layers: the oracle."""
    import keras

    ids = keras.Input((fields,), dtype="int64", name="ids")
    dense = keras.Input((dense_features,), name="dense")
    emb = keras.layers.Embedding(vocab, dim, name="emb")(ids)
    wide = keras.layers.Embedding(vocab, 1, name="wide")(ids)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(emb), dense])
    h = keras.layers.Dense(64, activation="relu", name="deep1")(h)
    h = keras.layers.Dense(32, activation="relu", name="deep2")(h)
    logit = keras.layers.Add()([keras.layers.Dense(1, name="deep_out")(h), keras.ops.sum(wide, axis=1)])
    return keras.Model({"ids": ids, "dense": dense}, logit)


def test_sync_step_with_tables_equals_the_same_steps_in_one_process(ray_session, small_ctr):
    """Oracle: Keras's own Embedding over the whole (small) vocabulary, updated by plain SGD in one process."""
    import keras
    import tensorflow as tf

    from shardps.training.feed import Batches, as_columns, worker_split
    from shardps.training.models import model_function
    from shardps.training.replica import Replica

    small_ctr(num_train=600, num_test=200, vocab=40)  # 40 ids per field: many duplicates in a batch
    config = TrainConfig(model="widedeep", mode="sync", num_shards=3, num_workers=2, steps=3, batch_size=32,
                         optimizer="sgd", lr=0.1, table_optimizer="sgd", table_lr=0.5, embedding_dim=4, seed=5,
                         eval_every=100)  # SGD on rows too: Adagrad would not notice a wrong scale
    probe = np.arange(8 * 40)
    store, seen = {}, {}

    def capture(event):  # the rows at the end, before the store is shut down
        if event["step"] == config.steps:
            seen.update(store["ps"].pull([], rows={name: probe for name in store["tables"]}))

    history = train(config, progress=capture,
                    on_start=lambda ps, workers: store.update(ps=ps, tables=list(ps.layout.tables)))
    assert sorted(seen) == ["emb", "wide"]

    data = load("ctr", seed=config.seed)
    model = _plain_widedeep(8, 4, 4, len(probe))
    dense = Replica(model_function(config, data.input_shape, 2), seed=config.seed).get_weights()  # the run's start
    tables = {"emb": Uniform(-0.05, 0.05).rows(probe, 4, name="emb", seed=5), "wide": np.zeros((len(probe), 1))}
    variables = {v.path: v for v in model.trainable_variables}
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
    parts = worker_split(len(data.x_train), config.num_workers, seed=config.seed)
    batches = [Batches(as_columns(data.x_train[idx]), data.y_train[idx], config.batch_size, seed=config.seed * 1000 + i)
               for i, idx in enumerate(parts)]
    for step in range(config.steps):
        grads = []
        for b in batches:
            x, y = b.batch(step)
            for path, v in variables.items():
                v.assign(tables[path.split("/")[0]] if path.endswith("embeddings") else dense[path])
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x)[:, 0])  # the built-in model squeezes its output
            grads.append({p: tf.convert_to_tensor(g).numpy()
                          for p, g in zip(variables, tape.gradient(loss, list(variables.values())))})
        for key in dense:  # the mean over workers, lr scaled by the worker count
            dense[key] = dense[key] - config.lr * 2 * (grads[0][key] + grads[1][key]) / 2
        for name in tables:  # each id's gradients summed over workers, then / W; rows not scaled
            tables[name] = tables[name] - config.table_lr * (grads[0][f"{name}/embeddings"] +
                                                             grads[1][f"{name}/embeddings"]) / 2

    for key, expected in dense.items():
        np.testing.assert_allclose(history.weights[key], expected, rtol=1e-4, atol=1e-6, err_msg=key)
    for name, expected in tables.items():
        np.testing.assert_allclose(seen[name], expected, rtol=1e-4, atol=1e-6, err_msg=name)
    pushed = np.unique(np.concatenate([b.batch(s)[0]["ids"].ravel() for b in batches for s in range(config.steps)]))
    assert history.table_rows == {"emb": len(pushed), "wide": len(pushed)}
    assert not np.allclose(seen["emb"], Uniform(-0.05, 0.05).rows(probe, 4, name="emb", seed=5))  # rows moved


@pytest.mark.slow  # TensorFlow
def test_traced_steps_of_any_batch_and_row_count_give_the_eager_gradients_from_one_trace(small_ctr):
    """A worker's step runs traced, on the function traced for its first batch (a retrace per batch size or
    row count would cost 50-100 ms a step); oracle: the first step of a fresh replica, which runs eagerly."""
    from shardps.training.feed import as_columns
    from shardps.training.models import model_function
    from shardps.training.replica import Replica

    small_ctr(num_train=300, num_test=100, vocab=50)
    config = TrainConfig(model="widedeep", embedding_dim=4, seed=3)
    data = load("ctr", seed=config.seed)
    build = model_function(config, data.input_shape, 2)
    x_all, rng = as_columns(data.x_train), np.random.default_rng(0)
    traced = Replica(build, seed=config.seed)
    for start, size in ((0, 32), (0, 32), (32, 48), (80, 17), (100, 1)):
        x, y = {k: v[start:start + size] for k, v in x_all.items()}, data.y_train[start:start + size]
        weights, ids = traced.zero_rows(x)
        weights.update({name: rng.normal(size=rows.shape).astype(np.float32) for name, rows in weights.items()
                        if name in ids})
        dense, rows, logs = traced.compute_gradients(x, y, weights, ids)
        want_dense, want_rows, want_logs = Replica(build, seed=config.seed).compute_gradients(x, y, weights, ids)
        for key in want_dense:
            np.testing.assert_allclose(dense[key], want_dense[key], rtol=1e-5, atol=1e-7, err_msg=key)
        for name, (want_ids, want) in want_rows.items():
            np.testing.assert_array_equal(rows[name][0], want_ids)
            np.testing.assert_allclose(rows[name][1], want, rtol=1e-5, atol=1e-7, err_msg=name)
        assert logs["loss"] == pytest.approx(want_logs["loss"], rel=1e-5)
    assert traced._grad_fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_each_mode_learns_close_to_the_teacher(ray_session, small_ctr, mode):
    small_ctr(num_train=200_000, num_test=10_000)
    history = train(TrainConfig(model="widedeep", mode=mode, num_shards=2, eval_every=1000))
    summary = history.summary()
    assert summary["teacher_auc"] > 0.75
    assert summary["teacher_auc"] - summary["test_auc"] < 0.03, summary
    assert summary["test_logloss"] - summary["teacher_logloss"] < 0.03, summary
    assert summary["table_rows"] > 1000 and summary["steps"] == 200_000 // 2 // 256 + 1


def test_resume_brings_the_tables_back_into_another_shard_count(ray_session, small_ctr, tmp_path):
    small_ctr(num_train=4000, num_test=500)
    probe = {"emb": np.arange(0, 8 * 100_000, 100_000 // 8), "wide": np.arange(0, 8 * 100_000, 100_000 // 8)}
    store, rows = {}, {}

    def at_end(event):  # the first run's rows, as saved at its last step
        if event["step"] == 4:
            rows["end"] = store["ps"].pull([], rows=probe)

    def at_start(ps, workers):  # the resumed run's rows before it trains
        store["ps"] = ps
        if "end" in rows:
            rows["start"] = ps.pull([], rows=probe)

    first = train(TrainConfig(model="widedeep", num_shards=2, steps=4, checkpoint_dir=str(tmp_path)),
                  progress=at_end, on_start=at_start)
    resumed = train(TrainConfig(model="widedeep", num_shards=3, steps=6, checkpoint_dir=str(tmp_path), resume=True),
                    on_start=at_start)
    assert resumed.start_step == 4 and set(resumed.table_rows) == set(first.table_rows)
    for name in probe:
        np.testing.assert_array_equal(rows["start"][name], rows["end"][name], err_msg=name)
    assert not np.array_equal(rows["end"]["emb"], Uniform(-0.05, 0.05).rows(probe["emb"], 16, name="emb", seed=0))


def test_sync_ctr_run_with_replicas_ends_bit_identical_after_a_shard_is_killed(ray_session, small_ctr):
    """Tables included: the killed shard copies its replica, the step's row gradients are re-sent and
    applied once, so dense weights and rows match an undisturbed run bit for bit."""
    small_ctr(num_train=20_000, num_test=1000)
    config = TrainConfig(model="widedeep", num_shards=2, steps=30, replicas=2, seed=2, eval_every=1000)
    ids = np.concatenate([np.arange(f * 100_000, f * 100_000 + 300) for f in range(8)])
    probe = {"emb": ids, "wide": ids}

    def run(kill: bool):
        store, rows, killed = {}, {}, []

        def progress(event):
            if kill and not killed and event["step"] >= 12:
                killed.append(store["ps"].stats()[0]["pid"])
                os.kill(killed[0], signal.SIGKILL)
            if event["step"] == config.steps:
                rows.update(store["ps"].pull([], rows=probe))

        history = train(config, progress=progress, on_start=lambda ps, workers: store.update(ps=ps))
        assert killed or not kill
        return history, rows

    (calm, calm_rows), (hit, hit_rows) = run(False), run(True)
    assert [r["from"] for r in hit.recoveries] == ["replica"]
    for key, weights in calm.weights.items():
        np.testing.assert_array_equal(hit.weights[key], weights, err_msg=key)
    for name, rows in calm_rows.items():
        np.testing.assert_array_equal(hit_rows[name], rows, err_msg=name)
