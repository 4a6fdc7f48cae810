"""Synchronous (BSP) training: every step, every worker, the same weights."""
from __future__ import annotations

import itertools
import logging
import uuid

from ray.exceptions import RayActorError, RayTaskError

from shardps.errors import ShardUnavailableError
from shardps.handle import Handle, gather, wait_alive

log = logging.getLogger(__name__)


def run_sync(ps, workers: list, start: int, steps: int, on_step, config) -> None:
    """Run barrier steps ``start + 1 .. steps``. Blocks; raises what a worker or shard raised.

    Each step every worker pulls the same weights and returns one packed
    gradient message per shard as its own object ref; each shard receives the
    W refs (never opened by the driver), averages them and applies once.

    Step ``t`` trains on each worker's mini-batch ``t - 1``. A shard that
    dies is restarted by Ray and sent the step's gradients again. A worker
    that dies is restarted and the whole step is retried with every worker on
    the same mini-batches (up to ``config.max_restarts`` times per step). The
    step's pushes carry (driver id, step), so a shard that had already
    applied the step skips any retry.
    """
    driver = f"sync-{uuid.uuid4().hex}"
    losses: list[float] = []
    for i, step in enumerate(range(start + 1, steps + 1)):
        for attempt in itertools.count():
            try:
                losses.extend(_step(ps, workers, (driver, step, i), batch=step - 1, retries=config.max_restarts))
                break
            except (RayActorError, RayTaskError, ShardUnavailableError) as exc:
                if attempt >= config.max_restarts:
                    raise
                log.warning("step %d failed (%s); retrying it", step, type(exc).__name__)
                for actor_method in [shard.ping for shard in ps.shards] + [w.pid for w in workers]:
                    wait_alive(actor_method)
        due = step % config.eval_every == 0 or step == steps
        on_step(step, losses, evaluate_now=due, total=steps)
        if due:
            losses = []


def _step(ps, workers: list, tag: tuple, batch: int, retries: int) -> list[float]:
    """One barrier step on mini-batch ``batch``; returns the workers' losses. ``tag``: (client, seq, base version).

    A shard that dies is sent the same gradients again once Ray restarted it
    (the worker outputs outlive it); a worker that dies fails the step.
    """
    num_shards = ps.num_shards
    outs = [w.sync_step.options(num_returns=1 + num_shards).remote(batch) for w in workers]
    involved = [s for s in range(num_shards) if ps.layout.shard_segments[s]]

    def push(s: int):
        grads = [out[1 + s] for out in outs]
        if ps.replicas:  # refs inside a list: the shard passes them to its replica before fetching them
            return ps.shards[s].push_mean_refs.remote(tag, grads)
        return ps.shards[s].push_mean.remote(tag, *grads)  # Ray resolves them before the shard starts

    calls = [(ps.shards[s], lambda s=s: push(s)) for s in involved]
    if ps.replicas:  # a shard fetching refs itself would block (and the workers' pulls with it) until they exist
        losses = gather([out[0] for out in outs])
        Handle(calls, lambda acks: None, retries=retries).wait()
        return losses
    pushes = Handle(calls, lambda acks: None, retries=retries)
    losses = gather([out[0] for out in outs])  # first, so a dead worker fails the step before any re-send
    pushes.wait()
    return losses
