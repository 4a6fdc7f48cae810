"""The command line: bad flags fail with status 2 before Ray starts; --json prints the summary."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardps import cli
from tests.procs import descendants


@pytest.mark.parametrize("argv", [
    ["train", "--num-shards", "0"], ["train", "--lr", "-0.1"], ["train", "--model", "resnet"],
    ["train", "--dataset", "imagenet"], ["train", "--staleness", "2"], ["train", "--mode", "ssp", "--staleness", "-1"],
    ["train", "--steps", "10", "--epochs", "1"], ["train", "--num-workers", "x"], ["train", "--replicas", "3"],
    ["train", "--max-restarts", "-1"], ["train", "--replicas", "2", "--max-restarts", "0"],
    ["train", "--epochs", "inf"], ["train", "--epochs", "nan"], ["train", "--num-cpus", "-1"],
    ["train", "--checkpoint-dir", __file__],  # a file, not a folder
    ["train", "--checkpoint-dir", f"{__file__}/ckpt"], ["train", "--logdir", f"{__file__}/runs"],  # uncreatable
    ["train", "--model", "widedeep", "--dataset", "digits"], ["train", "--dataset", "ctr"],
    ["train", "--model", "widedeep", "--min-count", "0"], ["train", "--model", "widedeep", "--embedding-dim", "0"],
    ["train", "--model", "widedeep", "--max-rows", "0"], ["train", "--model", "widedeep", "--table-lr", "nan"],
    ["train", "--model", "widedeep", "--table-optimizer", "momentum"],
    ["train", "--shard-resources", "ps"], ["train", "--shard-resources", "[1]"],
    ["train", "--shard-resources", '{"ps": 0}'], ["train", "--worker-resources", '{"CPU": 1}'],
    ["train", "--worker-resources", '{"trainer": "1"}'],
])
def test_bad_flags_exit_2_before_ray_starts(monkeypatch, capsys, argv):
    monkeypatch.setattr("shardps.store.cluster.start_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: shardps train" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["export", "{ckpt}", "--out", "model.h5"], "--out must name a .keras file"),
    (["export", "{missing}", "--out", "model.keras"], "no checkpoint in"),
    (["export", "{ckpt}", "--out", "model.keras", "--model", "widedeep"], "--model must be module:function"),
    (["export", "{ckpt}"], "--out"),
])
def test_bad_export_flags_exit_2_before_tensorflow_loads(tmp_path, capsys, argv, message):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "LATEST").write_text("ckpt-00000001")
    argv = [a.format(ckpt=tmp_path / "ckpt", missing=tmp_path / "nothing") for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: shardps export" in (err := capsys.readouterr().err) and message in err
    assert not list(tmp_path.glob("*.keras")) and not list(tmp_path.glob("*.h5"))


def test_export_of_a_checkpoint_that_names_no_model_function_asks_for_it_before_tensorflow_loads(tmp_path, capsys):
    from tests import ckpt

    ckpt.write(tmp_path / "ckpt")  # its manifest has no "meta": no model function named
    assert cli.main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.keras")]) == 1
    err = capsys.readouterr().err
    assert "does not name its model function" in err and "shardps export --model module:function" in err
    assert not list(tmp_path.glob("*.keras"))


def test_config_errors_name_the_flag_as_typed(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "widedeep", "--table-lr", "nan"])
    err = capsys.readouterr().err
    assert "--table-lr must be a positive number" in err and "Argument" not in err


def test_bench_runs_the_benchmark_program_in_a_child_process(capfd):
    """`shardps bench` forwards to `python -m benchmarks.cli` (the library never imports benchmarks):
    an unknown benchmark is that program's usage error."""
    assert cli.main(["bench", "no-such-benchmark"]) == 2
    assert "invalid choice: 'no-such-benchmark'" in capfd.readouterr().err


def _train_json(tmp_path, *flags: str, env: dict) -> tuple[dict, str]:
    """Run ``shardps train FLAGS --json`` in a fresh process; its summary and its stderr. Fails on a non-zero exit."""
    out = subprocess.run([sys.executable, "-m", "shardps.cli", "train", *flags, "--json"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow
def test_train_json_summary_end_to_end(tmp_path):
    summary, stderr = _train_json(
        tmp_path, "--model", "mlp", "--dataset", "digits", "--steps", "30", "--num-shards", "2", "--replicas", "2",
        "--num-cpus", "2", "--eval-every", "10",
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")})  # the CLI's own default: token
    assert summary["steps"] == 30 and summary["mode"] == "sync" and summary["num_shards"] == 2
    assert summary["final_accuracy"] > 0.5  # 30 sync steps on digits learn something
    assert "step 30/30" in stderr  # plain progress lines when not on a terminal
    assert all(line.startswith("step ") for line in stderr.splitlines()), stderr[-3000:]  # nothing else


@pytest.mark.slow
def test_widedeep_json_summary_reports_the_teacher_and_the_tables(tmp_path):
    summary, stderr = _train_json(
        tmp_path, "--model", "widedeep", "--steps", "4", "--num-shards", "2", "--num-cpus", "2", "--min-count", "2",
        "--max-rows", "4000", "--table-optimizer", "ftrl", env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert summary["dataset"] == "ctr" and summary["steps"] == 4
    assert 0.5 < summary["teacher_auc"] < 1 and 0 < summary["teacher_logloss"] < 0.69
    assert 0 < summary["test_auc"] < 1 and summary["test_logloss"] > 0
    assert 0 < summary["table_rows"] < 16 * 4 * 2 * 256  # min-count 2: fewer rows than ids pushed, 16 tables
    assert "logloss=" in stderr and "auc=" in stderr


def _events(folder) -> dict[str, list[int]]:
    """Tag -> steps of every scalar in a TensorBoard event file, read with TensorFlow's own reader."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    (path,) = folder.glob("events.out.tfevents.*")
    tags: dict[str, list[int]] = {}
    for record in tf.data.TFRecordDataset(str(path)):
        event = event_pb2.Event.FromString(record.numpy())
        for value in event.summary.value:
            tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.slow
def test_default_run_prints_progress_and_summary_only_and_writes_tensorboard(tmp_path):
    """No TensorFlow or Ray start-up noise from any process (driver, shards, workers) on stdout or stderr."""
    out = subprocess.run(
        [sys.executable, "-m", "shardps.cli", "train", "--model", "mlp", "--dataset", "digits", "--steps", "20",
         "--num-shards", "2", "--num-cpus", "2", "--eval-every", "10", "--logdir", str(tmp_path / "tb")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "TF_CPP"))})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (out.stdout + out.stderr).splitlines()
    assert [line for line in lines if not line.startswith(("step ", "sync: 20 steps", "TensorBoard: "))] == []
    assert len([line for line in lines if line.startswith("step ")]) == 2
    (run,) = (tmp_path / "tb").iterdir()  # one folder per run
    tags = _events(run)
    assert tags["loss"] == list(range(1, 21))  # every sync step
    for tag in ["val/accuracy", "val/loss", "samples_per_s", "staleness/min", "staleness/mean", "staleness/max",
                *[f"shard{s}/{f}" for s in (0, 1) for f in ("bytes", "pushes", "pulls")]]:
        assert tags[tag] == [10, 20], tag  # every evaluation


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_unreachable_address_fails_fast_with_a_clear_message(tmp_path):
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "shardps.cli", "train", "--model", "mlp", "--dataset", "digits", "--steps", "1",
         "--address", "127.0.0.1:9"],  # the discard port: nothing listens there
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1:9" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - started < 60  # Ray alone kept retrying for minutes


# `python -m shardps.cli`, with Ctrl-C raising KeyboardInterrupt as in a terminal. A process started in the
# background inherits SIGINT ignored and Python rightly keeps it ignored: a test run started that way (CI
# scripts often are) would otherwise send a Ctrl-C that the CLI never sees.
_AS_FROM_A_TERMINAL = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "from shardps.cli import main; sys.exit(main())")


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_no_process_behind(tmp_path, signum, status):
    proc = subprocess.Popen(
        [sys.executable, "-c", _AS_FROM_A_TERMINAL, "train", "--model", "mlp", "--dataset", "digits", "--steps",
         "100000", "--num-shards", "2", "--num-cpus", "2", "--eval-every", "5"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    lines = []
    try:
        for line in proc.stderr:  # wait until training is really running
            if line.startswith("step "):
                break
        # keep reading: a CLI blocked writing to a full pipe (progress, Ray's forwarded logs) never exits
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        started = descendants(proc.pid)
        assert started, "Ray processes should be running under the CLI"
        proc.send_signal(signum)
        try:
            assert proc.wait(timeout=120) == status
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            proc.wait(timeout=30)
            raise AssertionError("the CLI did not exit:\n" + "".join(lines[-200:])) from None
    finally:
        proc.kill()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.5)  # polling for processes to exit, not synchronising work
    assert not [p for p in started if _alive(p)]


_USER_MODEL = '''
import keras, shardps

def build():
    ids = keras.Input((8,), dtype="int64", name="ids")
    dense = keras.Input((4,), name="dense")
    e = keras.layers.Flatten()(shardps.keras.Embedding("mine", 4, combiner=None)(ids))
    out = keras.layers.Dense(1, name="mine_out")(keras.layers.Concatenate()([e, dense]))
    model = keras.Model({"ids": ids, "dense": dense}, out)
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.AUC(from_logits=True, name="my_auc")])
    return model
'''


@pytest.mark.slow
def test_model_module_function_trains_a_users_model_from_the_current_folder(tmp_path):
    (tmp_path / "mymodels.py").write_text(_USER_MODEL)
    summary, stderr = _train_json(
        tmp_path, "--model", "mymodels:build", "--dataset", "ctr", "--steps", "6", "--num-shards", "2",
        "--num-cpus", "2", "--eval-every", "3", env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert summary["steps"] == 6 and summary["table_rows"] > 0
    assert set(summary["final"]) == {"loss", "my_auc", "val_loss", "val_my_auc"}
    assert 0 < summary["final"]["val_my_auc"] < 1
    assert "val_my_auc=" in stderr


def test_model_module_function_that_does_not_import_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", "no_such_module_here:build", "--steps", "1"])
    assert exit_.value.code == 2
    assert "cannot import module 'no_such_module_here'" in capsys.readouterr().err
