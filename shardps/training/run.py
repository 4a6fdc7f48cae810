"""Data-parallel training on the parameter server: sync (BSP), async (ASP), ssp.

:func:`train` is the entry point; the loops live in :mod:`.sync` and :mod:`.async_`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from shardps.store import checkpoint
from shardps.store.cluster import launch, launch_from
from shardps.training.config import TrainConfig, prepare_folders
from shardps.training.data import Dataset, load
from shardps.training.models import build_model
from shardps.store.optim import OPTIMIZERS
from shardps.store.initializers import Uniform, Zeros
from shardps.training.history import EvalPoint, History, staleness_summary
from shardps.training.board import Board, shard_scalars
from shardps.training.async_ import run_async
from shardps.training.crew import Crew
from shardps.training.sync import run_sync

__all__ = ["train", "TrainConfig", "History", "EvalPoint"]
log = logging.getLogger(__name__)

Progress = Callable[[dict], None]  # receives {"step", "total", "loss", and on evaluations "accuracy", ...}


def train(config: TrainConfig, *, progress: Progress | None = None,
          step_delays: Sequence[float] | None = None,
          on_start: Callable[[Any, list], None] | None = None) -> History:
    """Train ``config.model`` on ``config.dataset`` with a sharded parameter server.

    Blocks until the run ends. Starts (or joins) Ray, the shards and the
    workers, and removes all of them at the end, also on errors and Ctrl-C.

    Args:
        config: the run.
        progress: called after every step (sync) or poll (async) with a dict.
        step_delays: extra seconds per step for each worker in async/ssp
            (simulates slow workers; for tests and experiments).
        on_start: called with the router and the worker actors once they
            are up (for monitoring and fault-injection tests).

    Shards that crash are restarted by Ray (up to ``max_restarts`` times)
    when there is something to restart them from: with ``replicas=2`` they
    copy their replica (nothing lost), else with ``checkpoint_dir`` they
    reload the latest checkpoint (what was pushed since is lost). Each
    restart is reported in ``History.recoveries``. Crashed workers are
    replaced and the run carries on, up to ``max_restarts`` times each.

    Returns:
        The :class:`History` of evaluations and the run's totals.

    Raises:
        ValueError: bad config or data; FileNotFoundError: MNIST asked for and missing;
        TimeoutError: the cluster has no room for the shards or the workers.
    """
    prepare_folders(config)
    data = load(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed,
                **({"test_data": config.test_data, "test_rows": config.test_rows, "skip_malformed": config.skip_malformed}
                   if config.dataset == "criteo" else {}))
    model = build_model(config.model, data.input_shape, data.num_classes, seed=config.seed,
                        embedding_dim=config.embedding_dim)
    steps = config.steps_for(len(data.x_train))
    history = History(config.mode, config.num_shards, config.num_workers, data.name, reference=data.reference)
    ps, history.start_step = _open_store(config, model)
    start = history.start_step
    with ps:
        if start >= steps:
            raise ValueError(f"the checkpoint in {config.checkpoint_dir} is at step {start}: nothing left of {steps} steps")
        crew = Crew(ps, data, config)
        if on_start is not None:
            on_start(ps, crew.actors)
        board = None
        try:
            if config.logdir:
                board = Board(config.logdir, f"{config.mode}-{config.num_shards}shards")
                history.logdir = str(board.path)
            on_step = _on_step(ps, model, data, config, history, progress, board)
            if config.mode == "sync":
                run_sync(ps, crew, start, steps, on_step, config)
            else:
                history.max_lead = run_async(ps, crew, start, steps, on_step, config, step_delays)
            history.ms_per_step = crew.phases_ms_per_step()
        finally:
            crew.remove()
            if board is not None:
                board.close()
        stats = ps.stats()
        history.staleness = staleness_summary(stats)
        history.recoveries = [{"shard": s["shard"], "from": s["restored_from"], "step": s["restored_step"]}
                              for s in stats if s["restarted"]]
        for lost in (s["shard"] for s in stats if s["replica"] == "lost"):
            log.warning("shard %d lost its replica during the run and finished unreplicated", lost)
        history.weights = ps.pull(model.names)
        history.table_rows = {name: info["rows"] for name, info in ps.tables().items()}
    history.steps = steps
    return history


def _open_store(config: TrainConfig, model):
    """Launch the shards: from the latest checkpoint on ``resume``, else with fresh weights.

    Returns ``(router, step to start from)``.
    """
    recoverable = config.checkpoint_dir or config.replicas > 1  # else a restarted shard has nothing to reload
    launch_kwargs = {"address": config.address, "num_cpus": config.num_cpus, "replicas": config.replicas,
                     "max_restarts": config.max_restarts if recoverable else 0, "checkpoint_dir": config.checkpoint_dir}
    if config.resume and checkpoint.latest(config.checkpoint_dir) is not None:
        saved = checkpoint.read(config.checkpoint_dir)
        manifest, params = saved.manifest, saved.params
        if set(params) != set(model.names) or set(saved.tables) != set(model.tables):
            raise ValueError(f"checkpoint in {config.checkpoint_dir} holds {sorted([*params, *saved.tables])[:4]}..., "
                             f"not the weights of model {config.model!r}")
        log.warning("resuming from %s at step %d", checkpoint.latest(config.checkpoint_dir), manifest["step"])
        ps = launch_from(saved, num_shards=config.num_shards, **launch_kwargs)
        if manifest["num_shards"] != config.num_shards:  # a restarting shard needs a checkpoint of this layout
            _or_shutdown(ps, lambda: ps.save(config.checkpoint_dir, step=manifest["step"]))
        return ps, manifest["step"]
    if config.resume:
        log.warning("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    lr = config.lr * config.num_workers if config.mode == "sync" and config.scale_lr else config.lr
    ps = launch(config.num_shards, optimizer=OPTIMIZERS[config.optimizer](lr=lr), block_bytes=config.block_bytes,
                **launch_kwargs)
    def fill() -> None:
        ps.register(model.get_weights())
        for name, dim in model.tables.items():  # embeddings start small and random, wide weights at zero
            ps.register_table(name, dim, initializer=Uniform(-0.05, 0.05) if dim > 1 else Zeros(),
                              optimizer=OPTIMIZERS[config.table_optimizer](lr=config.table_lr), min_count=config.min_count,
                              max_rows=config.max_rows, seed=config.seed)
        if config.checkpoint_dir:
            ps.save(config.checkpoint_dir, step=0)  # so a shard that crashes early has something to reload

    _or_shutdown(ps, fill)
    return ps, 0


def _or_shutdown(ps, action: Callable[[], None]) -> None:
    """Run ``action``; if it raises, remove the shards before re-raising."""
    try:
        action()
    except BaseException:
        ps.shutdown()
        raise


def _on_step(ps, model, data: Dataset, config: TrainConfig, history: History, progress: Progress | None,
             board: Board | None = None):
    """``on_step(step, losses, evaluate_now=, total=)``: report, evaluate, checkpoint and log to TensorBoard."""
    start = time.perf_counter()
    samples_per_step = config.num_workers * config.batch_size
    saved = history.start_step  # step of the last checkpoint

    def on_step(step: float, losses: list[float], *, evaluate_now: bool, total: int) -> None:
        nonlocal saved
        wall = time.perf_counter() - start
        loss = sum(losses) / len(losses) if losses else float("nan")
        event = {"step": step, "total": total, "loss": loss,
                 "samples_per_s": (step - history.start_step) * samples_per_step / wall}
        if evaluate_now:
            model.set_weights(ps.pull(model.names, rows=model.rows_needed(data.x_test)))
            metrics = model.evaluate(data.x_test, data.y_test)
            point = EvalPoint(step, wall, loss, metrics["accuracy"], event["samples_per_s"], metrics)
            history.points.append(point)
            history.wall_s, history.samples_per_s = wall, point.samples_per_s
            event.update(metrics)
        if board is not None:
            _to_board(board, ps, event, evaluate_now)
        every = config.checkpoint_every or total
        if config.checkpoint_dir and (int(step) // every > saved // every or (step >= total and saved < total)):
            saved = int(step)
            event["checkpoint"] = ps.save(config.checkpoint_dir, step=saved)
        if progress is not None:
            progress(event)

    return on_step


def _to_board(board: Board, ps, event: dict, evaluated: bool) -> None:
    """Loss at every step; at evaluations also accuracy, samples/s, staleness and per-shard counters."""
    scalars = {"loss": event["loss"]}
    if evaluated:
        stats = ps.stats()
        staleness = staleness_summary(stats)
        scalars.update({"test/accuracy": event["accuracy"], "samples_per_s": event["samples_per_s"],
                        **{f"staleness/{k}": staleness[k] for k in ("min", "mean", "max") if k in staleness},
                        **shard_scalars(stats)})
    board.write(event["step"], scalars)
