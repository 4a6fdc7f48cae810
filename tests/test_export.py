"""shardps export: a checkpoint's model as a plain Keras file that predicts what the trained model predicts,
loaded in a process that never imports shardps or Ray."""
import os
import subprocess
import sys

import numpy as np
import pytest
import ray.cloudpickle

import shardps
from shardps.store import checkpoint
from tests.test_fit import DIM, clicks, weighted_logloss

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SERVE = """
import sys
import numpy as np
import keras
model = keras.models.load_model(sys.argv[1])
inputs = dict(np.load(sys.argv[2], allow_pickle=False))
x = inputs.pop("x") if "x" in inputs else inputs
np.save(sys.argv[3], np.asarray(model.predict(x, batch_size=4096, verbose=0)))
print(sorted(m for m in ("shardps", "ray") if m in sys.modules))
"""


def served_predictions(model_path, x, tmp_path) -> np.ndarray:
    """Predictions of the model file on ``x`` (an array or a dict of arrays), in a fresh Python process;
    fails the test if that process imported shardps or Ray."""
    np.savez(tmp_path / "inputs.npz", **(x if isinstance(x, dict) else {"x": x}))
    out = subprocess.run([sys.executable, "-c", SERVE, str(model_path), str(tmp_path / "inputs.npz"),
                          str(tmp_path / "pred.npy")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", "the serving process imported shardps or Ray"
    return np.load(tmp_path / "pred.npy")


def trained_predictions(ckpt, build, x, *, zero_rows_missing: bool = False) -> np.ndarray:
    """What the trained model predicts for ``x``, as shardps's evaluation computes it: the model of ``build``
    on the weights and rows pulled from shards restored from the checkpoint (ids without a row: their
    initial value, or zeros with ``zero_rows_missing``)."""
    from shardps.training.replica import Replica

    replica = Replica(build)
    needed = replica.rows_needed(x)
    ps = shardps.restore(ckpt)
    try:
        weights = ps.pull(replica.names, rows=needed)
    finally:
        ps.shutdown()
    if zero_rows_missing:
        saved = checkpoint.read(ckpt).tables
        for table, ids in needed.items():
            weights[table][~np.isin(ids, saved[table]["ids"])] = 0.0
    replica.set_weights(weights, needed)
    return np.asarray(replica.model(x, training=False))


@pytest.fixture(scope="module")
def widedeep_run(ray_session, tmp_path_factory):
    """A short widedeep run on the synthetic click logs with checkpoints; ``(checkpoint dir, test inputs)``."""
    from shardps.training.data import load

    ckpt = tmp_path_factory.mktemp("widedeep") / "ckpt"
    shardps.train(shardps.TrainConfig(model="widedeep", steps=30, num_shards=2, checkpoint_dir=str(ckpt)))
    test = load("ctr").x_test[:4000]
    return ckpt, {"ids": test["ids"], "dense": test["dense"]}


def test_the_built_in_widedeep_exported_by_the_cli_predicts_as_trained(widedeep_run, tmp_path):
    from shardps.training.models import from_description

    ckpt, x = widedeep_run
    out = subprocess.run([sys.executable, "-m", "shardps.cli", "export", str(ckpt), "--out",
                          str(tmp_path / "widedeep.keras")], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    served = served_predictions(tmp_path / "widedeep.keras", x, tmp_path)
    build = from_description(checkpoint.read(ckpt).manifest["meta"]["model"])
    # emb rows start Uniform: an id without a row reads its initial value in training, zeros in the export
    covered = np.isin(x["ids"], checkpoint.read(ckpt).tables["emb"]["ids"]).all(axis=1)
    assert 0.1 < covered.mean() < 0.9  # both kinds of examples are there
    trained = trained_predictions(ckpt, build, x)
    np.testing.assert_allclose(served[covered], trained[covered], atol=1e-5)
    np.testing.assert_allclose(served, trained_predictions(ckpt, build, x, zero_rows_missing=True), atol=1e-5)
    assert not np.allclose(served[~covered], trained[~covered], atol=1e-5)  # the documented difference is real


def user_model():
    """Table ``t`` (Uniform rows) shared by a one-hot layer and a multi-hot mean; table ``z`` (Zeros rows, a
    multi-hot sum) adds a wide term."""
    import keras

    a = keras.Input((2,), dtype="int64", name="a")
    b = keras.Input((3,), dtype="int64", name="b")
    num = keras.Input((2,), name="num")
    ea = shardps.keras.Embedding("t", DIM)(a)
    eb = shardps.keras.Embedding("t", DIM, combiner="mean")(b)
    wb = shardps.keras.Embedding("z", 1, initializer=shardps.Zeros(), combiner="sum")(b)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(ea), eb, num])
    h = keras.layers.Dense(8, activation="relu")(h)
    model = keras.Model({"a": a, "b": b, "num": num}, keras.layers.Add()([keras.layers.Dense(1)(h), wb]))
    model.compile(loss=weighted_logloss)
    return model


def sequential_model():
    """A Sequential model: the sum of 3 ids' rows (Zeros rows, padding -1), then a dense layer."""
    import keras

    model = keras.Sequential([keras.Input((3,), dtype="int64"),
                              shardps.keras.Embedding("s", 3, initializer=shardps.Zeros(), combiner="sum",
                                                      optimizer=shardps.SGD(0.5)),
                              keras.layers.Dense(1)])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def unseen_ids(x: dict, seed: int = 1) -> dict:
    """``x`` with a fifth of its ids replaced by ids no training example has, and more padding."""
    rng = np.random.default_rng(seed)
    out = dict(x)
    for name in ("a", "b"):
        ids = x[name].copy()
        ids[rng.random(ids.shape) < 0.2] = rng.integers(1000, 2000)
        out[name] = ids
    out["b"][rng.random(out["b"].shape) < 0.2] = -1
    out["b"][:5] = -1  # examples with padding only
    return out


@pytest.mark.parametrize("build", [user_model, sequential_model])
def test_a_user_model_exported_predicts_as_trained(ray_session, tmp_path, build):
    x, y = clicks(256)
    x_test = unseen_ids(clicks(300, seed=7)[0])
    if build is sequential_model:
        x, x_test = x["b"], x_test["b"]
    ckpt = tmp_path / "ckpt"
    shardps.fit(build, x, y, steps=8, num_shards=2, checkpoint_dir=str(ckpt))
    assert checkpoint.read(ckpt).manifest["meta"]["model"] == {"function": f"{__name__}:{build.__name__}"}
    path = shardps.export(ckpt, tmp_path / "model.keras")  # the model function named by the checkpoint
    served = served_predictions(path, x_test, tmp_path)
    trained = trained_predictions(ckpt, build, x_test)
    exact = trained_predictions(ckpt, build, x_test, zero_rows_missing=True)
    np.testing.assert_allclose(served, exact, atol=1e-5)
    if build is sequential_model:  # Zeros rows: an id without a row reads zeros in training too
        np.testing.assert_allclose(served, trained, atol=1e-5)
    else:
        assert not np.allclose(served, trained, atol=1e-5)  # table t's ids without rows read their initial value
    assert np.abs(served).max() > 0.05  # a trained model, not zeros


def test_the_cli_exports_with_a_named_model_function(ray_session, tmp_path):
    import functools

    x, y = clicks(128)
    ckpt = tmp_path / "ckpt"
    shardps.fit(functools.partial(sequential_model), x["b"], y, steps=2, checkpoint_dir=str(ckpt))
    assert "model" not in checkpoint.read(ckpt).manifest["meta"]  # a partial has no name to store
    here = os.path.dirname(os.path.abspath(__file__))  # --model's module is imported from the current folder
    with pytest.raises(ValueError, match="does not name its model function"):
        shardps.export(ckpt, tmp_path / "m.keras")  # (the CLI says so before TensorFlow loads: test_cli)
    out = subprocess.run([sys.executable, "-m", "shardps.cli", "export", str(ckpt), "--out", str(tmp_path / "m.keras"),
                          "--model", f"{__name__}:sequential_model"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.path.dirname(here)}, cwd=here)
    assert out.returncode == 0, out.stderr[-3000:]
    x_test = clicks(100, seed=3)[0]["b"]
    np.testing.assert_allclose(served_predictions(tmp_path / "m.keras", x_test, tmp_path),
                               trained_predictions(ckpt, sequential_model, x_test), atol=1e-5)


def test_export_refuses_a_checkpoint_of_another_model_and_writes_nothing(widedeep_run, tmp_path):
    ckpt, _ = widedeep_run
    with pytest.raises(ValueError, match=r"does not hold this model's weights: missing 6: dense/bias, .*, table t, table z; "
                                         r"not in the model 8: deep1/bias, .*, ..."):
        shardps.export(ckpt, tmp_path / "m.keras", build=user_model)
    with pytest.raises(ValueError, match=r"does not hold this model's weights: missing 6: dense/bias"):
        shardps.fit(user_model, *clicks(64), steps=1, checkpoint_dir=str(ckpt), resume=True)  # the same check
    with pytest.raises(ValueError, match=r"\.keras"):
        shardps.export(ckpt, tmp_path / "m.h5")
    (ckpt_bad := tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        shardps.export(ckpt_bad, tmp_path / "m.keras")
    latest = checkpoint.latest(ckpt)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text((latest / "manifest.json").read_text())
    (corrupt / "arrays.npz").write_bytes((latest / "arrays.npz").read_bytes()[:5000])
    with pytest.raises(ValueError, match="arrays.npz"):
        shardps.export(corrupt, tmp_path / "m.keras")
    assert not list(tmp_path.glob("*.keras")) and not list(tmp_path.glob("*.h5"))
