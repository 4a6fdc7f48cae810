"""Asynchronous training: ASP (no bound) and SSP (bounded staleness)."""
from __future__ import annotations

from typing import Sequence

import logging

import ray
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)

_POLL_S = 0.5  # how often the driver reports progress while workers run


def run_async(ps, crew, start: int, steps: int, on_step, config, eval_every: int,
              step_delays: Sequence[float] | None) -> int:
    """Let every worker loop pull -> compute -> push ``steps - start`` times; evaluate every ``eval_every``.

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
    next_eval, logs, last_logs = start + eval_every, [], []
    while runs:
        ready, _ = ray.wait(list(runs), num_returns=1, timeout=_POLL_S)
        progress = ray.get(clock.progress.remote())
        logs.extend(progress["logs"])
        for ref in ready:
            i = runs.pop(ref)
            try:
                ray.get(ref)  # a worker's own error (model, loss, data) is raised here and ends the run
            except RayActorError as exc:  # the worker died: a new one carries on where it stopped
                crew.replace(i, exc)
                progress = ray.get(clock.progress.remote())
                logs.extend(progress["logs"])
                runs[launch_run(i, progress["done"][i])] = i
        step = start + sum(progress["done"]) / len(workers)
        due = next_eval <= step < steps  # the last step is evaluated once, below, when every worker returned
        if step < steps:
            on_step(step, logs, evaluate_now=due, total=steps)
        if due:
            next_eval, logs, last_logs = next_eval + eval_every, [], logs or last_logs
    final = ray.get(clock.progress.remote())
    logs.extend(final["logs"])
    on_step(steps, logs or last_logs, evaluate_now=True, total=steps)  # no step since: the last window's
    return final["max_lead"]
