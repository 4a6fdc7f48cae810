"""Synchronous (BSP) training: every step, every worker, the same weights."""
from __future__ import annotations

from shardps.router import gather


def run_sync(ps, workers: list, start: int, steps: int, on_step, config) -> None:
    """Run barrier steps ``start + 1 .. steps``. Blocks; raises what a worker or shard raised.

    Each step every worker pulls the same weights and returns one packed
    gradient message per shard as its own object ref; each shard receives the
    W refs (never opened by the driver), averages them and applies once.
    """
    num_shards = ps.num_shards
    involved = [s for s in range(num_shards) if ps.layout.shard_segments[s]]
    losses: list[float] = []
    for i, step in enumerate(range(start + 1, steps + 1)):
        outs = [w.sync_step.options(num_returns=1 + num_shards).remote() for w in workers]
        tag = (None, None, i)  # every worker pulled at shard version i: staleness 0
        acks = [ps.shards[s].push_mean.remote(tag, *[out[1 + s] for out in outs]) for s in involved]
        losses.extend(gather([out[0] for out in outs]))
        gather(acks)
        due = step % config.eval_every == 0 or step == steps
        on_step(step, losses, evaluate_now=due, total=steps)
        if due:
            losses = []
