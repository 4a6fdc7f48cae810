"""Asynchronous training: ASP (no bound) and SSP (bounded staleness)."""
from __future__ import annotations

from typing import Sequence

import ray

from shardps.trainers.clock import StepClock

_POLL_S = 0.5  # how often the driver reports progress while workers run


def run_async(ps, workers: list, start: int, steps: int, on_step, config,
              step_delays: Sequence[float] | None) -> int:
    """Let every worker loop pull -> compute -> push ``steps - start`` times; evaluate as they go.

    Blocks until all workers finish; raises what a worker raised. Returns the
    largest lead of one worker over the slowest that was seen.
    """
    clock = ray.remote(StepClock).options(num_cpus=0).remote(len(workers), config.bound)
    try:
        delays = list(step_delays or [0.0] * len(workers))
        runs = [w.run.remote(steps - start, clock, max_inflight=config.max_inflight, step_delay=delays[i])
                for i, w in enumerate(workers)]
        next_eval, losses = start + config.eval_every, []
        while True:
            _, running = ray.wait(runs, num_returns=len(runs), timeout=_POLL_S)
            progress = ray.get(clock.progress.remote())
            losses.extend(progress["losses"])
            step = start + sum(progress["done"]) / len(workers)
            due = step >= next_eval and running
            on_step(step, losses, evaluate_now=bool(due), total=steps)
            if due:
                next_eval, losses = next_eval + config.eval_every, []
            if not running:
                break
        ray.get(runs)  # re-raises a worker's error
        final = ray.get(clock.progress.remote())
        losses.extend(final["losses"])
        on_step(steps, losses, evaluate_now=True, total=steps)
        return final["max_lead"]
    finally:
        ray.kill(clock)
