"""shardps.fit with a user's own Keras model, loss, metrics and data; shardps.keras.Embedding against oracles."""
import functools
import os
import signal
import sys
import threading

import numpy as np
import pytest
import ray.cloudpickle

import shardps
from shardps.store import checkpoint
from shardps.store.initializers import Uniform
from tests.procs import exit_within, named

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers get this module's functions by value

VOCAB, DIM = 30, 4


def clicks(n: int = 256, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Inputs ``a`` (2 ids), ``b`` (up to 3 ids, padded with -1) and ``num`` (2 floats); learnable 0/1 labels."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, VOCAB, (n, 2))
    b = np.where(rng.random((n, 3)) < 0.3, -1, rng.integers(0, VOCAB, (n, 3)))
    num = rng.standard_normal((n, 2)).astype(np.float32)
    y = (((a[:, 0] % 3) == 0) ^ (num[:, 0] > 0.5)).astype(np.float32)
    return {"a": a, "b": b, "num": num}, y


def weighted_logloss(y, logit):
    """A custom loss function: positives count twice."""
    import tensorflow as tf

    y, logit = tf.reshape(tf.cast(y, tf.float32), [-1]), tf.reshape(logit, [-1])
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logit) * (1.0 + y)


def shared_table_model(table_lr: float = 0.5, metrics: bool = True):
    """Two layers share table ``t``: one id per field of ``a``, the mean of ``b``'s ids (multi-hot)."""
    import keras

    a = keras.Input((2,), dtype="int64", name="a")
    b = keras.Input((3,), dtype="int64", name="b")
    num = keras.Input((2,), name="num")
    table = {"optimizer": shardps.SGD(table_lr)}
    ea = shardps.keras.Embedding("t", DIM, **table)(a)
    eb = shardps.keras.Embedding("t", DIM, combiner="mean", **table)(b)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(ea), eb, num])
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    model = keras.Model({"a": a, "b": b, "num": num}, keras.layers.Dense(1, name="out")(h))
    model.compile(loss=weighted_logloss, metrics=[keras.metrics.AUC(from_logits=True, name="auc"),
                                                  keras.metrics.BinaryAccuracy(threshold=0.0, name="acc")]
                  if metrics else [])
    return model


def _oracle_sgd(x, y, initial: dict, rows: np.ndarray, *, workers: int, steps: int, batch: int, lr: float,
                table_lr: float):
    """Sync SGD in one process, written in TensorFlow with the whole table as one matrix: the oracle.

    Worker ``i`` reads the ``i``-th contiguous part in order (``shuffle=False``).
    """
    import tensorflow as tf

    def forward(w, table, xb):
        ea = tf.reshape(tf.gather(table, xb["a"]), [len(xb["a"]), -1])
        real = tf.cast(xb["b"] >= 0, tf.float32)[..., None]
        eb = tf.reduce_sum(tf.gather(table, np.maximum(xb["b"], 0)) * real, 1) / tf.maximum(tf.reduce_sum(real, 1), 1)
        h = tf.nn.relu(tf.concat([ea, eb, xb["num"]], 1) @ w["hidden/kernel"] + w["hidden/bias"])
        return h @ w["out/kernel"] + w["out/bias"]

    w = {k: tf.Variable(v) for k, v in initial.items()}
    table = tf.Variable(rows)
    part = len(y) // workers
    for step in range(steps):
        grads = []
        for i in range(workers):
            rows_here = slice(i * part + step * batch, i * part + (step + 1) * batch)
            xb = {k: v[rows_here] for k, v in x.items()}
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(weighted_logloss(y[rows_here], forward(w, table, xb)))
            grads.append(tape.gradient(loss, [*w.values(), table]))
        for j, v in enumerate(w.values()):
            v.assign_sub(lr * workers * sum(g[j] for g in grads) / workers)  # sync scales the rate by W
        table.assign_sub(table_lr * sum(tf.convert_to_tensor(g[-1]) for g in grads) / workers)
    return {k: v.numpy() for k, v in w.items()}, table.numpy()


def _initial(build, seed: int = 0) -> dict:
    from shardps.training.replica import Replica

    return Replica(build, seed=seed).get_weights()


def test_sync_sgd_with_a_shared_multi_hot_table_equals_one_process(ray_session, tmp_path):
    x, y = clicks(256)
    steps, batch, lr, table_lr = 3, 16, 0.1, 0.5
    history = shardps.fit(shared_table_model, x, y, mode="sync", num_shards=2, num_workers=2, steps=steps,
                          batch_size=batch, shuffle=False, optimizer=shardps.SGD(lr), checkpoint_dir=str(tmp_path))
    initial = _initial(shared_table_model)
    start_rows = Uniform(-0.05, 0.05).rows(np.arange(VOCAB), DIM, name="t", seed=0)
    dense, rows = _oracle_sgd(x, y, initial, start_rows, workers=2, steps=steps, batch=batch, lr=lr, table_lr=table_lr)

    saved = checkpoint.read(tmp_path)
    for key, expected in dense.items():
        np.testing.assert_allclose(history.weights[key], expected, rtol=1e-4, atol=1e-6, err_msg=key)
    table = saved.tables["t"]
    np.testing.assert_allclose(table["params"], rows[table["ids"]], rtol=1e-4, atol=1e-6)
    used = np.unique(np.concatenate([x["a"][:48].ravel(), x["b"][:48].ravel(), x["a"][128:176].ravel(),
                                     x["b"][128:176].ravel()]))
    assert sorted(table["ids"]) == [i for i in used if i >= 0]  # rows of the ids trained on, padding never
    assert not np.allclose(rows, start_rows)  # the comparison means something
    assert set(history.history) == {"loss", "auc", "acc"}  # no validation data: no val_ entries


def test_combiner_mean_and_sum_against_numpy(ray_session):
    """The layer alone, rows bound by hand: each example's ids less padding, summed or averaged."""
    import keras

    from shardps.keras import RowLookup

    ids = np.array([[3, -1, 7], [-1, -1, -1], [7, 7, 2]])
    rows = {2: np.full(2, 1.0), 3: np.array([1.0, 2.0]), 7: np.array([10.0, 20.0])}
    lookup = RowLookup("t", 2)
    lookup.bind(np.array([2, 3, 7]), np.stack([rows[2], rows[3], rows[7]]).astype(np.float32))
    for combiner in ("sum", "mean"):
        layer = shardps.keras.Embedding("t", 2, combiner=combiner)
        layer.lookup = lookup
        out = np.asarray(layer(keras.ops.convert_to_tensor(ids)))
        expected = [np.sum([rows[i] for i in row if i >= 0] or [np.zeros(2)], axis=0) for row in ids]
        if combiner == "mean":
            expected = [e / max(1, (row >= 0).sum()) for e, row in zip(expected, ids)]
        np.testing.assert_allclose(out, expected, err_msg=combiner)


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_user_model_with_custom_loss_and_two_metrics_learns_in_each_mode(ray_session, mode):
    x, y = clicks(4096, seed=1)
    x_val, y_val = clicks(1024, seed=2)
    history = shardps.fit(functools.partial(shared_table_model, 0.05), x, y, validation_data=(x_val, y_val),
                          mode=mode, num_shards=2, num_workers=2, epochs=3, batch_size=64,
                          optimizer=shardps.Adam(0.01))
    h = history.history
    assert set(h) == {"loss", "auc", "acc", "val_loss", "val_auc", "val_acc"}
    # sync evaluates every epoch; async and ssp when the driver's poll sees an epoch end, so a run that fast
    # may evaluate the end only (an earlier evaluation, not being a barrier, can see later weights)
    assert len(h["val_auc"]) >= (3 if mode == "sync" else 1) and all(len(v) == len(h["val_auc"]) for v in h.values())
    assert h["val_auc"][-1] > 0.75, h  # the labels are a function of a's first id and num: learnable
    m = y_val.mean()  # the best constant prediction's weighted logloss (positives count twice): no learning
    constant = -(2 * m * np.log(2 * m / (1 + m)) + (1 - m) * np.log(1 - 2 * m / (1 + m)))
    assert h["val_loss"][-1] < 0.8 * constant, (h, constant)


def test_a_ray_dataset_gives_what_the_same_arrays_give(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    x, y = clicks(256)
    options = dict(mode="sync", num_shards=2, num_workers=2, steps=5, batch_size=16, optimizer=shardps.SGD(0.1),
                   shuffle=False)
    arrays = shardps.fit(shared_table_model, x, y, validation_data=(x, y), **options)
    columns = {"a": list(x["a"]), "b": list(x["b"]), "num": list(x["num"]), "label": y}
    pq.write_table(pa.table(columns), tmp_path / "clicks.parquet")
    from_numpy = ray.data.from_items([{"a": x["a"][i], "b": x["b"][i], "num": x["num"][i], "label": y[i]}
                                      for i in range(len(y))])
    from_parquet = ray.data.read_parquet(str(tmp_path / "clicks.parquet"))
    for dataset in (from_numpy, from_parquet):
        streamed = shardps.fit(shared_table_model, dataset, validation_data=dataset, **options)
        for key, expected in arrays.weights.items():
            np.testing.assert_allclose(streamed.weights[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(streamed.history["val_loss"], arrays.history["val_loss"], rtol=1e-5)


def test_resume_and_a_replaced_worker_with_a_user_model(ray_session, tmp_path):
    x, y = clicks(2048, seed=3)
    options = dict(mode="sync", num_shards=2, num_workers=2, batch_size=32, checkpoint_dir=str(tmp_path),
                   checkpoint_every=5, optimizer=shardps.SGD(0.1))
    first = shardps.fit(shared_table_model, x, y, steps=10, **options)
    killed = []

    def kill_a_worker(event):
        if not killed and event["step"] >= 14:
            killed.append(named("ray::Worker")[0])
            os.kill(killed[0], signal.SIGKILL)

    resumed = shardps.fit(shared_table_model, x, y, steps=20, resume=True, progress=kill_a_worker, **options)
    calm = shardps.fit(shared_table_model, x, y, steps=20, **{**options, "checkpoint_dir": str(tmp_path / "calm")})
    assert killed and first.steps == 10 and resumed.start_step == 10
    for key, expected in calm.weights.items():  # resumed at 10 and a worker replaced at 14: the same run
        np.testing.assert_allclose(resumed.weights[key], expected, rtol=1e-5, atol=1e-7, err_msg=key)


def not_compiled():
    import keras

    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


def not_a_model():
    return 42


def two_dims():
    import keras

    ids = keras.Input((2,), dtype="int64", name="ids")
    e = keras.layers.Concatenate()([keras.layers.Flatten()(shardps.keras.Embedding("t", 4)(ids)),
                                    keras.layers.Flatten()(shardps.keras.Embedding("t", 8)(ids))])
    model = keras.Model(ids, keras.layers.Dense(1)(e))
    model.compile(loss="mse")
    return model


def vector_loss():
    import keras

    class PerExample(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.square(y_pred[:, 0] - y)

    inputs = keras.Input((2,), name="x")
    model = PerExample(inputs, keras.layers.Dense(1)(inputs))
    model.compile(loss="mse")
    return model


_LOCK = threading.Lock()


def _unpicklable():
    with _LOCK:
        return shared_table_model()


@pytest.mark.parametrize("build, error, match", [
    (not_compiled, TypeError, "must compile"),
    (not_a_model, TypeError, "must return a keras.Model"),
    (two_dims, ValueError, "table 't' is used by two"),
    (vector_loss, ValueError, "loss must be a scalar"),
    (_unpicklable, TypeError, "must be picklable"),
], ids=["not compiled", "not a model", "two dims", "vector loss", "unpicklable"])
def test_a_bad_model_function_fails_before_anything_starts(ray_session, build, error, match):
    x = {"x": np.ones((8, 2), np.float32), "ids": np.ones((8, 2), np.int64), **clicks(8)[0]}
    data = {k: x[k] for k in (("a", "b", "num") if build is _unpicklable else ("ids",) if build is two_dims
                              else ("x",))}
    data = data["x"] if list(data) == ["x"] else data
    before = set(named("ray::ParameterShard"))  # an earlier test's shards may still be on their way out
    with pytest.raises(error, match=match):
        shardps.fit(build, data, np.zeros(8, np.float32), steps=1, num_shards=1, num_workers=1)
    assert set(named("ray::ParameterShard")) <= before  # nothing was started


@pytest.mark.parametrize("columns, match", [(("a", "num"), r"missing \['b'\]"),
                                             (("a", "b", "num", "extra"), r"extra \['extra'\]")])
def test_data_that_does_not_match_the_model_inputs_is_named(ray_session, columns, match):
    x, y = clicks(32)
    x["extra"] = x["num"]
    with pytest.raises(ValueError, match=match):
        shardps.fit(shared_table_model, {k: x[k] for k in columns}, y, steps=1)


def test_a_ray_dataset_without_the_label_column_is_refused(ray_session):
    import ray

    dataset = ray.data.from_items([{"a": [1, 2], "b": [1, -1, -1], "num": [0.0, 1.0], "clicked": 1.0}] * 8)
    with pytest.raises(ValueError, match="no label column 'label'.*clicked"):
        shardps.fit(shared_table_model, dataset, steps=1)


def nan_check_model():
    """Fails in a step that sees a NaN input: only workers read those rows (the driver checks the first batch)."""
    import keras
    import tensorflow as tf

    inputs = keras.Input((2,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(loss=lambda y, p: tf.debugging.check_numerics(tf.reduce_mean(tf.square(p - y)), "user loss saw NaN"))
    return model


def test_an_error_in_a_workers_step_is_raised_once_and_every_actor_removed(ray_session, caplog):
    x = np.ones((256, 2), np.float32)
    x[200:] = np.nan  # worker 1's part (rows 128..255), its fifth batch
    with pytest.raises(Exception, match="user loss saw NaN") as raised:
        shardps.fit(nan_check_model, x, np.zeros(256, np.float32), steps=8, batch_size=16, shuffle=False,
                    num_workers=2, max_restarts=3)
    assert "ray::Worker.sync_step()" in str(raised.value)  # where it happened: the worker's step
    assert "retrying" not in caplog.text and "replacing" not in caplog.text  # raised at once, never retried
    assert exit_within("ray::Worker") == [] and exit_within("ray::ParameterShard") == []


def test_workers_that_cannot_be_placed_fail_fast_naming_the_resources(ray_session, monkeypatch):
    import ray

    from shardps.training import crew

    monkeypatch.setattr(crew, "PLACEMENT_TIMEOUT_S", 2.0)
    hog = ray.remote(num_cpus=1.9)(type("Hog", (), {"ping": lambda self: 1})).remote()
    ray.get(hog.ping.remote())
    try:
        with pytest.raises(TimeoutError, match="CPU"):
            shardps.fit(shared_table_model, *clicks(64), steps=1, num_workers=4, num_shards=4)
    finally:
        ray.kill(hog)
    assert exit_within("ray::Worker") == [] and exit_within("ray::ParameterShard") == []


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    """The README's "Your own model" example, copied out and run in a fresh process."""
    import ast
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "example.py").write_text(code)
    out = subprocess.run([sys.executable, "example.py"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    history = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # the printed dict of lists
    assert set(history) == {"loss", "auc", "val_loss", "val_auc"} and history["val_auc"][-1] > 0.9
