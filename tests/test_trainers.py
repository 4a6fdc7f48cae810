"""Trainers against oracles: sync == single-process SGD; SSP bounds the lead, ASP does not."""
import numpy as np
import pytest
import ray

from shardps.training.config import TrainConfig
from shardps.training.data import load_digits
from shardps.training.feed import Batches, worker_split
from shardps.training.models import model_function
from shardps.training.run import train


@pytest.mark.parametrize("num_shards", [2, 4])
def test_sync_equals_single_process_sgd_on_concatenated_batches(ray_session, num_shards):
    config = TrainConfig(mode="sync", num_shards=num_shards, num_workers=3, steps=3, batch_size=16,
                         lr=0.05, model="mlp", dataset="digits", block_bytes=4096, seed=7)
    history = train(config)

    from shardps.keras import keras, tf
    from shardps.training.replica import Replica

    data = load_digits(seed=config.seed)
    build = model_function(config, data.input_shape, data.num_classes)
    weights = initial = Replica(build, seed=config.seed).get_weights()  # where the run started
    model = build()  # the oracle: plain Keras, one process
    variables = dict(zip(initial, model.trainable_variables))
    parts = worker_split(len(data.x_train), config.num_workers, seed=config.seed)
    batches = [Batches(data.x_train[idx], data.y_train[idx], config.batch_size, seed=config.seed * 1000 + i)
               for i, idx in enumerate(parts)]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for step in range(config.steps):
        xs, ys = zip(*(b.batch(step) for b in batches))
        for name, v in variables.items():
            v.assign(weights[name])
        with tf.GradientTape() as tape:
            loss = loss_fn(np.concatenate(ys), model(np.concatenate(xs)))
        grads = dict(zip(variables, (g.numpy() for g in tape.gradient(loss, list(variables.values())))))
        weights = {k: w - config.lr * config.num_workers * grads[k] for k, w in weights.items()}  # linear scaling

    assert set(history.weights) == set(weights)
    for key, expected in weights.items():
        np.testing.assert_allclose(history.weights[key], expected, rtol=1e-4, atol=1e-5, err_msg=key)
    assert not np.allclose(weights["dense1/kernel"], initial["dense1/kernel"])  # the comparison means something
    assert history.staleness["max"] == 0


SLOW = [0.25, 0.0, 0.0]  # worker 0 is slow


def test_ssp_never_lets_a_worker_lead_by_more_than_the_bound(ray_session):
    config = TrainConfig(mode="ssp", staleness=1, num_shards=2, num_workers=3, steps=8, model="mlp",
                         dataset="digits", eval_every=100)
    history = train(config, step_delays=SLOW)
    assert history.max_lead <= 1
    assert history.steps == 8 and 0 <= history.final_accuracy <= 1


def test_asp_lets_fast_workers_run_ahead_of_a_slow_one(ray_session):
    config = TrainConfig(mode="async", num_shards=2, num_workers=3, steps=8, model="mlp",
                         dataset="digits", eval_every=100)
    history = train(config, step_delays=SLOW)
    # timing-based, with a wide margin: the slow worker needs 8 x 0.25 s = 2 s, a fast step takes ~20 ms
    # here, so the fast workers lead by more than 2 unless their steps take over 0.1 s each (5x slower)
    assert history.max_lead > 2  # without a bound the fast workers leave the slow one behind


def test_resume_continues_from_checkpoint_with_another_shard_count(ray_session, tmp_path):
    first = TrainConfig(mode="sync", num_shards=2, steps=20, model="mlp", dataset="digits", eval_every=10,
                        checkpoint_dir=str(tmp_path), checkpoint_every=10)
    done = train(first)
    resumed = train(TrainConfig(mode="sync", num_shards=4, steps=30, model="mlp", dataset="digits", eval_every=10,
                                checkpoint_dir=str(tmp_path), resume=True))
    assert resumed.start_step == 20 and resumed.steps == 30
    assert [p.step for p in resumed.points] == [30]  # only the remaining steps ran
    assert resumed.final_accuracy >= done.final_accuracy - 0.05  # it did not start from scratch


def test_phase_timings_skip_a_worker_that_died_after_its_last_step(ray_session):
    """A worker killed once its run() returned must not fail the run when its timings are collected."""
    from shardps.training.crew import Crew

    @ray.remote(num_cpus=0)
    class Finished:
        def phases(self):
            return {"steps": 10, "compute": 0.5}

    alive, dead = Finished.remote(), Finished.remote()
    ray.get(dead.phases.remote())
    ray.kill(dead, no_restart=True)
    crew = object.__new__(Crew)  # only its actors matter here
    crew.actors = [alive, dead]
    assert crew.phases_ms_per_step() == {"compute": 50.0}


class _Remote:
    """A stand-in for an actor method: ``.remote(*args)`` returns ``value(*args)`` as its 'ref'."""

    def __init__(self, value):
        self.value = value

    def remote(self, *args, **kwargs):
        return self.value(*args, **kwargs)


def test_async_evaluates_the_last_step_once_with_its_losses(monkeypatch):
    """Every worker has reported its last step but its run() has not returned yet: the driver must not
    evaluate the last step then and again after the runs return (with no losses left: loss=nan)."""
    from types import SimpleNamespace

    from shardps.training import async_

    progress = iter([{"done": [3, 3], "logs": [0.5, 0.4], "max_lead": 1},  # all steps reported, runs pending
                     {"done": [3, 3], "logs": [], "max_lead": 1},  # the runs returned
                     {"done": [3, 3], "logs": [], "max_lead": 1}])  # final
    polls = iter([[], ["run-0", "run-1"]])
    fake_ray = SimpleNamespace(wait=lambda refs, num_returns, timeout: (next(polls), None),
                               get=lambda ref: next(progress) if ref == "progress" else None)
    monkeypatch.setattr(async_, "ray", fake_ray)
    workers = [SimpleNamespace(run=_Remote(lambda *a, i=i, **k: f"run-{i}")) for i in range(2)]
    crew = SimpleNamespace(actors=workers, clock=SimpleNamespace(progress=_Remote(lambda: "progress")))
    config = SimpleNamespace(bound=None, max_inflight=2, prefetch=True)
    calls = []
    async_.run_async(None, crew, 0, 3, lambda step, losses, evaluate_now, total: calls.append(
        (step, list(losses), evaluate_now)), config, 3, None)
    assert [c for c in calls if c[2]] == [(3, [0.5, 0.4], True)]
    assert all(step < 3 for step, _, due in calls if not due)


def test_async_prefetch_reads_every_batch_once_and_trains_on_them_in_order():
    """A worker reading ahead (prefetch: batch i + 2's rows asked for with push i) keeps what it read for the
    step that trains on it: each mini-batch is read once, and step i trains on batch i."""
    from collections import Counter
    from types import SimpleNamespace

    from shardps.training.worker import Worker

    reads, trained = [], []

    class CountingBatches:
        def batch(self, k):
            reads.append(k)
            return np.full(2, k), np.zeros(2)

    class Model:
        names = []

        def rows_needed(self, x):
            return {"t": x}

        def compute_gradients(self, x, y, weights, needed):
            trained.append(int(x[0]))
            return {}, {}, {}

    handle = SimpleNamespace(wait=lambda: {})
    worker = Worker.__new__(Worker)  # without __init__: no TensorFlow model
    worker.index, worker._kept, worker._steps, worker._phase_s = 0, {}, 0, Counter()
    worker._batches, worker._model = CountingBatches(), Model()
    worker._router = SimpleNamespace(pull=lambda *a, **k: handle, push=lambda *a, **k: handle,
                                     push_pull=lambda *a, **k: handle)
    clock = SimpleNamespace(tick=SimpleNamespace(remote=lambda *a: None))
    assert worker.run(0, 6, clock, bounded=False, prefetch=True) == 6
    assert trained == list(range(6))
    assert sorted(reads) == list(range(6))
