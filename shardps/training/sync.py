"""Synchronous (BSP) training: every step, every worker, the same weights."""
from __future__ import annotations

import itertools
import logging

from ray.exceptions import RayActorError, RayTaskError

from shardps.store.errors import ShardUnavailableError
from shardps.store.handle import gather
from shardps.training.crew import process_failure

log = logging.getLogger(__name__)


def run_sync(ps, crew, start: int, steps: int, on_step, config, eval_every: int) -> None:
    """Run barrier steps ``start + 1 .. steps``, evaluating every ``eval_every``. Blocks; raises what a worker
    or shard raised.

    Each step every worker computes on the same weights and returns one
    packed gradient message per shard as its own object ref; each shard
    receives the W refs (never opened by the driver), averages them, applies
    once and answers each worker's pull for its next step in the same call
    (the driver hands the answers on: one round trip per shard and step).

    Step ``t`` trains on each worker's mini-batch ``t - 1``. A shard that
    dies is restarted by Ray and sent the step's gradients again. A worker
    that dies is replaced and the whole step is retried with every worker on
    the same mini-batches (up to ``config.max_restarts`` times per step). The
    step's pushes are numbered by the step, so a shard that had already
    applied the step skips any retry. An error raised by a worker's own code
    (model, loss, data) is not retried: it is raised at once.
    """
    logs: list[dict] = []
    replies = None  # per worker: its weights for this step, answered with the previous step's update
    for i, step in enumerate(range(start + 1, steps + 1)):
        for attempt in itertools.count():
            try:
                step_logs, replies = _step(ps, crew.actors, step, base_version=i, batch=step - 1, replies=replies,
                                           ahead=step < steps and not ps.replicated)
                logs.extend(step_logs)
                break
            except (RayActorError, RayTaskError, ShardUnavailableError) as exc:
                replies = None  # the retry pulls afresh
                if attempt >= config.max_restarts or not process_failure(exc):
                    raise
                log.warning("step %d failed (%s); retrying it", step, type(exc).__name__)
                ps.wait_available()
                for dead in crew.dead():
                    crew.replace(dead, exc)
        due = step % eval_every == 0 or step == steps
        on_step(step, logs, evaluate_now=due, total=steps)
        if due:
            logs = []


def _step(ps, workers: list, step: int, base_version: int, batch: int, replies: list | None,
          ahead: bool) -> tuple[list[dict], list | None]:
    """One barrier step on mini-batch ``batch``; returns the workers' logs and, with ``ahead``, each
    worker's weights for the next step (``replies`` for the next call: each worker's weights for this one,
    or None to let them pull).

    A shard that dies is sent the same gradients again once Ray restarted it
    (the worker outputs outlive it); a worker that dies fails the step.
    """
    outs = [w.sync_step.options(num_returns=1 + ps.num_shards).remote(batch, None if replies is None else replies[i],
                                                                      ahead)
            for i, w in enumerate(workers)]
    grads = [[out[1 + s] for out in outs] if involved else [] for s, involved in enumerate(ps.involved())]
    if ps.replicated:  # a shard fetching refs itself would block (and the workers' pulls with it) until they exist
        logs = gather([out[0] for out in outs])
        ps.push_mean(grads, step=step, base_version=base_version)
        return logs, None
    push = ps.push_mean_pull if ahead else ps.push_mean
    pushes = push(grads, step=step, base_version=base_version, wait=False)
    logs = gather([out[0] for out in outs])  # first, so a dead worker fails the step before any re-send
    answers = pushes.wait()
    return logs, answers if ahead else None
