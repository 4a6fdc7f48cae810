"""Data-parallel training on the parameter server: sync (BSP), async (ASP), ssp.

:func:`train` is the entry point; the loops live in :mod:`.sync` and :mod:`.async_`.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import ray

from shardps.cluster import launch
from shardps.config import TrainConfig
from shardps.data import Dataset, load, worker_split
from shardps.models import build_model
from shardps.optim import OPTIMIZERS
from shardps.trainers.history import EvalPoint, History, staleness_summary
from shardps.trainers.worker import Worker

__all__ = ["train", "TrainConfig", "History", "EvalPoint"]
log = logging.getLogger(__name__)

Progress = Callable[[dict], None]  # receives {"step", "total", "loss", and on evaluations "accuracy", ...}


def train(config: TrainConfig, *, progress: Progress | None = None,
          step_delays: Sequence[float] | None = None) -> History:
    """Train ``config.model`` on ``config.dataset`` with a sharded parameter server.

    Blocks until the run ends. Starts (or joins) Ray, the shards and the
    workers, and removes all of them at the end, also on errors and Ctrl-C.

    Args:
        config: the run.
        progress: called after every step (sync) or poll (async) with a dict.
        step_delays: extra seconds per step for each worker in async/ssp
            (simulates slow workers; for tests and experiments).

    Returns:
        The :class:`History` of evaluations and the run's totals.

    Raises:
        ValueError: bad config or data; FileNotFoundError: MNIST asked for and missing.
    """
    data = load(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed)
    steps = config.steps_for(len(data.x_train))
    lr = config.lr * config.num_workers if config.mode == "sync" and config.scale_lr else config.lr
    optimizer = OPTIMIZERS[config.optimizer](lr=lr)
    history = History(config.mode, config.num_shards, config.num_workers, data.name)
    with launch(config.num_shards, optimizer=optimizer, address=config.address, num_cpus=config.num_cpus,
                block_bytes=config.block_bytes) as ps:
        ps.register(model.get_weights())
        workers = _start_workers(ps, data, config)
        try:
            evaluate = _evaluator(ps, model, data, config, history, progress)
            if config.mode == "sync":
                from shardps.trainers.sync import run_sync
                run_sync(ps, workers, steps, evaluate, config)
            else:
                from shardps.trainers.async_ import run_async
                history.max_lead = run_async(ps, workers, steps, evaluate, config, step_delays)
        finally:
            for worker in workers:
                ray.kill(worker)
        history.staleness = staleness_summary(ps.stats())
        history.weights = ps.pull()
    history.steps = steps
    return history


def _start_workers(ps, data: Dataset, config: TrainConfig) -> list:
    """One Worker actor per part of the training data, spread over the cluster."""
    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    cpus = min(1.0, max(0.01, (total_cpus - 0.01 * ps.num_shards) / config.num_workers))  # all must fit
    actor = ray.remote(Worker).options(num_cpus=cpus, scheduling_strategy="SPREAD")
    parts = worker_split(len(data.x_train), config.num_workers, seed=config.seed)
    return [
        actor.remote(i, ps, config.model, data.input_shape, data.num_classes, data.x_train[idx],
                     data.y_train[idx], config.batch_size, seed=config.seed)
        for i, idx in enumerate(parts)
    ]


def _evaluator(ps, model, data: Dataset, config: TrainConfig, history: History, progress: Progress | None):
    """``evaluate(step, losses, final)``: test accuracy at the current weights, recorded and reported."""
    start = time.perf_counter()
    samples_per_step = config.num_workers * config.batch_size

    def evaluate(step: float, losses: list[float], *, evaluate_now: bool, total: int) -> None:
        wall = time.perf_counter() - start
        loss = sum(losses) / len(losses) if losses else float("nan")
        event = {"step": step, "total": total, "loss": loss, "samples_per_s": step * samples_per_step / wall}
        if evaluate_now:
            model.set_weights(ps.pull())
            point = EvalPoint(step, wall, loss, model.evaluate(data.x_test, data.y_test), event["samples_per_s"])
            history.points.append(point)
            history.wall_s, history.samples_per_s = wall, point.samples_per_s
            event["accuracy"] = point.accuracy
        if progress is not None:
            progress(event)

    return evaluate
