"""Fault injection: SIGKILL a shard or a worker mid-training; the run completes.

Every kill happens from the progress callback once training is 40% done, so
no sleep stands in for synchronisation. Sync runs are deterministic and are
compared bit for bit. Async runs are not (the interleaving of pushes differs
from run to run), so an async run hit by a kill is compared with an
undisturbed one within 0.02 accuracy: what these tests guard against, a
shard coming back without its parameters or a run that stops, costs far
more than that.
"""
import os
import signal

import numpy as np
import pytest

from shardps.training.config import TrainConfig
from shardps.training.run import train
from tests.procs import named


def _train_and_kill(config, victim=None, delays=None):
    """Run ``config``; if ``victim(ps, workers) -> pid`` is given, SIGKILL that pid at 40% of the steps."""
    started, killed = {}, []

    def on_start(ps, workers):
        started.update(ps=ps, workers=workers)

    def progress(event):
        if victim is not None and not killed and event["step"] >= 0.4 * config.steps:
            pid = victim(started["ps"], started["workers"])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    history = train(config, progress=progress, on_start=on_start, step_delays=delays)
    assert victim is None or killed, "the kill never happened"
    return history


def _config(mode, tmp_path, name, steps=200, replicas=1):
    saves = {"checkpoint_dir": str(tmp_path / name), "checkpoint_every": 10} if replicas == 1 else {}
    return TrainConfig(mode=mode, num_shards=2, num_workers=2, steps=steps, model="mlp", dataset="digits", lr=0.05,
                       eval_every=50, seed=5, replicas=replicas, **saves)


def _shard0(ps, workers):
    return ps.stats()[0]["pid"]


def _worker0(ps, workers):
    """A training worker's pid, read from /proc: asking the busy actor would wait until its run() returned."""
    busy = named("ray::Worker")
    assert busy, "no worker process found"
    return busy[0]


_DELAYS = {"sync": None, "async": [0.01, 0.01]}  # async: slow enough for the driver to see 40% before the end


@pytest.fixture(scope="module")
def calm_async(ray_session, tmp_path_factory):
    """An undisturbed async run: what both async shard kills are compared with."""
    return _train_and_kill(_config("async", tmp_path_factory.mktemp("calm"), "calm"), delays=_DELAYS["async"])


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_shard_killed_mid_training_recovers_from_checkpoint(ray_session, request, tmp_path, mode):
    if mode == "async":
        calm = request.getfixturevalue("calm_async")
    else:
        calm = _train_and_kill(_config(mode, tmp_path, "calm"))
    hit = _train_and_kill(_config(mode, tmp_path, "hit"), _shard0, delays=_DELAYS[mode])
    assert [(r["shard"], r["from"]) for r in hit.recoveries] == [(0, "checkpoint")]
    assert 0 <= hit.recoveries[0]["step"] <= hit.steps  # what was lost: the pushes after this checkpoint
    assert hit.steps == calm.steps == 200
    assert abs(hit.final_accuracy - calm.final_accuracy) <= 0.02, (hit.final_accuracy, calm.final_accuracy)


def test_shard_killed_mid_async_training_with_replicas_loses_nothing(calm_async, tmp_path):
    hit = _train_and_kill(_config("async", tmp_path, "hit", replicas=2), _shard0, delays=_DELAYS["async"])
    assert hit.recoveries == [{"shard": 0, "from": "replica", "step": None}]
    assert hit.steps == calm_async.steps == 200
    assert abs(hit.final_accuracy - calm_async.final_accuracy) <= 0.02, (hit.final_accuracy, calm_async.final_accuracy)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_worker_killed_mid_training_run_completes(ray_session, tmp_path, mode):
    history = _train_and_kill(_config(mode, tmp_path, "w", steps=100), _worker0, delays=_DELAYS[mode])
    assert history.steps == 100 and history.final_accuracy > 0.5
    assert history.recoveries == []  # no shard was touched


def test_async_workers_killed_three_times_use_one_restart_each(ray_session, tmp_path):
    """Each death counts once: resubmitting to a worker that Ray is still restarting used to burn restarts."""
    config = _config("async", tmp_path, "w3", steps=100)
    kills = []

    def progress(event):
        if len(kills) < 3 and event["step"] >= (len(kills) + 1) * 0.25 * config.steps:
            pid = _worker0(None, None)
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)

    history = train(config, progress=progress, step_delays=_DELAYS["async"])
    assert len(kills) == 3
    assert history.steps == 100 and history.final_accuracy > 0.5


@pytest.fixture(scope="module")
def calm_sync(ray_session, tmp_path_factory):
    return _train_and_kill(_config("sync", tmp_path_factory.mktemp("calm"), "calm", steps=100, replicas=2))


@pytest.mark.parametrize("victim", [_shard0, _worker0], ids=["shard", "worker"])
def test_sync_training_with_replicas_ends_exactly_where_an_undisturbed_run_does(calm_sync, tmp_path, victim):
    """Sync, replicated: a killed shard is re-sent the step's gradients, a killed worker's step is
    retried on the same mini-batches; nothing is lost or applied twice, so the weights match bit for bit."""
    hit = _train_and_kill(_config("sync", tmp_path, "hit", steps=100, replicas=2), victim)
    assert [r["from"] for r in hit.recoveries] == (["replica"] if victim is _shard0 else [])
    assert set(hit.weights) == set(calm_sync.weights)
    for key, weights in calm_sync.weights.items():
        np.testing.assert_array_equal(hit.weights[key], weights, err_msg=key)
