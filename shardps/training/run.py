"""Data-parallel training on the parameter server: sync (BSP), async (ASP), ssp.

:func:`train` is the entry point; the loops live in :mod:`.sync` and :mod:`.async_`.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

from shardps.store import checkpoint
from shardps.store.cluster import launch, launch_from, using_ray
from shardps.training.config import TrainConfig, prepare_folders
from shardps.training.data import criteo_data, load
from shardps.training.feed import Examples, RunData
from shardps.training.models import description, model_function
from shardps.training.history import EvalPoint, History, staleness_summary
from shardps.training.board import Board, shard_scalars
from shardps.training.async_ import run_async
from shardps.training.crew import Crew
from shardps.training.sync import run_sync

__all__ = ["train", "run", "TrainConfig", "History", "EvalPoint"]
EVAL_CHUNK = 65536  # validation examples whose rows are pulled at once
log = logging.getLogger(__name__)

Progress = Callable[[dict], None]  # receives {"step", "total", "loss", and on evaluations "accuracy", ...}


def train(config: TrainConfig, *, progress: Progress | None = None,
          step_delays: Sequence[float] | None = None,
          on_start: Callable[[Any, list], None] | None = None) -> History:
    """Train ``config.model`` on ``config.dataset`` (the built-in datasets) with a sharded parameter server.

    Blocks until the run ends; see :func:`run` for what it starts and how it
    recovers. Raises ``FileNotFoundError`` when MNIST is asked for and missing,
    and what :func:`run` raises.
    """
    prepare_folders(config)
    options = {"progress": progress, "step_delays": step_delays, "on_start": on_start}
    if config.dataset == "criteo":
        return _train_on_criteo(config, options)
    data = load(config.dataset, data_dir=config.data_dir, download=config.download, seed=config.seed)
    build = model_function(config, data.input_shape, data.num_classes)
    run_data = RunData(Examples(data.x_train, data.y_train), Examples(data.x_test, data.y_test), data.name,
                       data.reference)
    return run(config, build, run_data, model=description(config, data.input_shape, data.num_classes), **options)


def _train_on_criteo(config: TrainConfig, options: dict) -> History:
    """:func:`train` on Criteo-format files, read through Ray Data (:func:`criteo_data`): Ray starts (or is
    joined) first, once the paths are known to hold files."""
    from shardps.training import criteo

    for path in (config.data_dir, config.test_data):
        if path is not None:
            criteo.files(path)  # FileNotFoundError / ValueError before anything starts
    shape = (criteo.NUM_CATEGORICAL, criteo.NUM_DENSE)
    with using_ray(config.address, config.num_cpus):
        data = criteo_data(config.data_dir, test_data=config.test_data, test_rows=config.test_rows,
                           skip_malformed=config.skip_malformed)
        return run(config, model_function(config, shape, 2), data, model=description(config, shape, 2), **options)


def run(config: TrainConfig, build: Callable, data: RunData, *, progress: Progress | None = None,
        step_delays: Sequence[float] | None = None, on_start: Callable[[Any, list], None] | None = None,
        model: dict | None = None) -> History:
    """Train the model of ``build`` (a model function) on ``data`` with a sharded parameter server.

    Blocks until the run ends. First checks, on the driver, that the model
    builds, pickles and computes a step on the first training rows (nothing
    is started before); then starts (or joins) Ray, the shards and the
    workers, and removes all of them at the end, also on errors and Ctrl-C.

    Args:
        config: the run.
        build: the model function (see :mod:`shardps.training.models`).
        data: training and validation examples.
        progress: called after every step (sync) or poll (async) with a dict.
        step_delays: extra seconds per step for each worker in async/ssp
            (simulates slow workers; for tests and experiments).
        on_start: called with the router and the worker actors once they
            are up (for monitoring and fault-injection tests).
        model: how to rebuild ``build`` (see :func:`~shardps.training.models.description`;
            default: from ``config.model``), stored with every checkpoint for ``shardps export``.

    Shards that crash are restarted by Ray (up to ``max_restarts`` times)
    when there is something to restart them from: with ``replicas=2`` they
    copy their replica (nothing lost), else with ``checkpoint_dir`` they
    reload the latest checkpoint (what was pushed since is lost). Each
    restart is reported in ``History.recoveries``. Crashed workers are
    replaced and the run carries on, up to ``max_restarts`` times each. An
    error raised in a worker's step (the user's model, loss or data) ends the
    run: it is raised here with the worker's traceback.

    Returns:
        The :class:`History` of evaluations and the run's totals.

    Raises:
        ValueError / TypeError: bad config, model or data (named);
        TimeoutError: the cluster has no room for the shards or the workers.
    """
    from shardps.training.replica import checked_replica  # loads TensorFlow

    prepare_folders(config)
    replica = checked_replica(build, data, config)
    steps = config.steps_for(len(data.train))
    history = History(config.mode, config.num_shards, config.num_workers, data.name, reference=data.reference)
    described = model or description(config)
    meta = {"model": described} if described else {}
    ps, history.start_step = _open_store(config, replica, meta)
    start = history.start_step
    with ps:
        if start >= steps:
            raise ValueError(f"the checkpoint in {config.checkpoint_dir} is at step {start}: nothing left of {steps} steps")
        parts = data.train.parts(config.num_workers, config.seed)  # Ray Data reads now, before workers take the CPUs
        validation = None if data.validation is None else data.validation.materialize()  # read once, evaluated often
        crew = Crew(ps, parts, config, build, replica.names)
        if on_start is not None:
            on_start(ps, crew.actors)
        board = None
        try:
            if config.logdir:
                board = Board(config.logdir, f"{config.mode}-{config.num_shards}shards")
                history.logdir = str(board.path)
            on_step = _on_step(ps, replica, validation, config, history, progress, board, meta)
            every = config.eval_every or config.steps_per_epoch(len(data.train))
            if config.mode == "sync":
                run_sync(ps, crew, start, steps, on_step, config, every)
            else:
                history.max_lead = run_async(ps, crew, start, steps, on_step, config, every, step_delays)
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
        history.weights = ps.pull(replica.names)
        history.table_rows = {name: info["rows"] for name, info in ps.tables().items()}
    history.steps = steps
    return history


def _open_store(config: TrainConfig, model, meta: dict):
    """Launch the shards: from the latest checkpoint on ``resume``, else with fresh weights; checkpoints
    written here carry ``meta``.

    Returns ``(router, step to start from)``.
    """
    recoverable = config.checkpoint_dir or config.replicas > 1  # else a restarted shard has nothing to reload
    launch_kwargs = {"address": config.address, "num_cpus": config.num_cpus, "replicas": config.replicas,
                     "shard_resources": config.shard_resources,
                     "max_restarts": config.max_restarts if recoverable else 0, "checkpoint_dir": config.checkpoint_dir}
    if config.resume and checkpoint.latest(config.checkpoint_dir) is not None:
        saved = checkpoint.read(config.checkpoint_dir)
        manifest = saved.manifest
        model.check_saved(saved, config.checkpoint_dir)
        log.warning("resuming from %s at step %d", checkpoint.latest(config.checkpoint_dir), manifest["step"])
        ps = launch_from(saved, num_shards=config.num_shards, **launch_kwargs)
        if manifest["num_shards"] != config.num_shards:  # a restarting shard needs a checkpoint of this layout
            _or_shutdown(ps, lambda: ps.save(config.checkpoint_dir, step=manifest["step"], meta=meta))
        return ps, manifest["step"]
    if config.resume:
        log.warning("no checkpoint in %s: starting from scratch", config.checkpoint_dir)
    ps = launch(config.num_shards, optimizer=config.dense_optimizer(), block_bytes=config.block_bytes, **launch_kwargs)

    def fill() -> None:
        ps.register(model.get_weights())
        for name, spec in model.tables.items():
            ps.register_table(name, spec.dim, initializer=spec.initializer, optimizer=spec.optimizer,
                              min_count=spec.min_count, max_rows=spec.max_rows, seed=spec.seed)
        if config.checkpoint_dir:
            ps.save(config.checkpoint_dir, step=0, meta=meta)  # so a shard that crashes early has something to reload

    _or_shutdown(ps, fill)
    return ps, 0


def _or_shutdown(ps, action: Callable[[], None]) -> None:
    """Run ``action``; if it raises, remove the shards before re-raising."""
    try:
        action()
    except BaseException:
        ps.shutdown()
        raise


def _on_step(ps, model, validation, config: TrainConfig, history: History, progress: Progress | None,
             board: Board | None, meta: dict):
    """``on_step(step, logs, evaluate_now=, total=)``: report, evaluate, checkpoint (with ``meta``) and log to
    TensorBoard.

    ``logs``: the workers' per-step logs (loss and metrics) since the last evaluation.
    """
    start = time.perf_counter()
    samples_per_step = config.num_workers * config.batch_size
    saved = history.start_step  # step of the last checkpoint

    def on_step(step: float, logs: list[dict], *, evaluate_now: bool, total: int) -> None:
        nonlocal saved
        wall = time.perf_counter() - start
        train = _means(logs)
        event = {"step": step, "total": total, **train,
                 "samples_per_s": (step - history.start_step) * samples_per_step / wall}
        if evaluate_now:
            metrics = {} if validation is None else model.evaluate(
                validation.chunks(EVAL_CHUNK), lambda needed: ps.pull(model.names, rows=needed))
            point = EvalPoint(step, wall, event["samples_per_s"], train, metrics)
            history.points.append(point)
            history.wall_s, history.samples_per_s = wall, point.samples_per_s
            event.update({f"val_{k}": v for k, v in metrics.items()})
        if board is not None:
            _to_board(board, ps, event, evaluate_now)
        every = config.checkpoint_every or total
        if config.checkpoint_dir and (int(step) // every > saved // every or (step >= total and saved < total)):
            saved = int(step)
            event["checkpoint"] = ps.save(config.checkpoint_dir, step=saved, meta=meta)
        if progress is not None:
            progress(event)

    return on_step


def _means(logs: list[dict]) -> dict[str, float]:
    """Per name, the mean of the values in ``logs`` (``loss`` NaN when there are none)."""
    if not logs:
        return {"loss": float("nan")}
    return {name: sum(log[name] for log in logs) / len(logs) for name in logs[0]}


def _to_board(board: Board, ps, event: dict, evaluated: bool) -> None:
    """Loss at every step; at evaluations also the validation metrics, samples/s, staleness and per-shard counters."""
    scalars = {"loss": event["loss"]}
    if evaluated:
        stats = ps.stats()
        staleness = staleness_summary(stats)
        scalars.update({f"val/{k[4:]}": v for k, v in event.items() if k.startswith("val_")})
        scalars.update({"samples_per_s": event["samples_per_s"],
                        **{f"staleness/{k}": staleness[k] for k in ("min", "mean", "max") if k in staleness},
                        **shard_scalars(stats)})
    board.write(event["step"], scalars)
