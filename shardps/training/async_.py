"""Asynchronous training: ASP (no bound) and SSP (bounded staleness)."""
from __future__ import annotations

from typing import Sequence

import logging

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the driver reports progress while workers run


def run_async(ps, crew, start: int, steps: int, on_step, config,
              step_delays: Sequence[float] | None) -> int:
    """Let every worker loop pull -> compute -> push ``steps - start`` times; evaluate as they go.

    Blocks until all workers finish; raises what a worker raised. A worker
    that dies is replaced (``crew.replace``) and its successor carries on
    from the step it had reached. Returns the largest lead of one worker over
    the slowest that was seen.
    """
    workers, clock = crew.actors, crew.clock
    delays = list(step_delays or [0.0] * len(workers))

    def launch_run(i: int, done: int):
        return workers[i].run.remote(done, steps - start, clock, bounded=config.bound is not None,
                                     max_inflight=config.max_inflight, step_delay=delays[i], batch_offset=start,
                                     prefetch=config.prefetch and config.bound is None)

    runs = {launch_run(i, 0): i for i in range(len(workers))}
    next_eval, losses, last_losses = start + config.eval_every, [], []
    while runs:
        ready, _ = ray.wait(list(runs), num_returns=1, timeout=_POLL_S)
        progress = ray.get(clock.progress.remote())
        for ref in ready:
            i = runs.pop(ref)
            try:
                ray.get(ref)
            except RayActorError as exc:  # the worker died: a new one carries on where it stopped
                crew.replace(i, exc)
                progress = ray.get(clock.progress.remote())
                runs[launch_run(i, progress["done"][i])] = i
        losses.extend(progress["losses"])
        step = start + sum(progress["done"]) / len(workers)
        due = next_eval <= step < steps  # the last step is evaluated once, below, when every worker returned
        if step < steps:
            on_step(step, losses, evaluate_now=due, total=steps)
        if due:
            next_eval, losses, last_losses = next_eval + config.eval_every, [], losses or last_losses
    final = ray.get(clock.progress.remote())
    losses.extend(final["losses"])
    on_step(steps, losses or last_losses, evaluate_now=True, total=steps)  # no loss since: the last window's
    return final["max_lead"]
