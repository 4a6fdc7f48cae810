"""StepClock: the actor that bounds staleness (SSP) and reports async progress."""
from __future__ import annotations

import asyncio


class StepClock:
    """Counts finished steps per worker; holds a worker back when it leads by more than ``bound``.

    An asyncio actor: ``wait_turn`` calls wait on a condition without
    blocking ``tick`` calls from the other workers.

    Args:
        num_workers: number of workers reporting.
        bound: max lead over the slowest worker (SSP's K); None for no bound (ASP).
    """

    def __init__(self, num_workers: int, bound: int | None):
        self._done = [0] * num_workers
        self._bound = bound
        self._cond = asyncio.Condition()
        self._logs: list[dict] = []
        self._max_lead = 0

    def _may_start(self, step: int) -> bool:
        return self._bound is None or step - min(self._done) <= self._bound

    async def wait_turn(self, worker: int, step: int) -> int:
        """Block until ``worker`` may start ``step``; return its lead over the slowest worker."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._may_start(step))
            lead = step - min(self._done)
            self._max_lead = max(self._max_lead, lead)
            return lead

    async def tick(self, worker: int, done: int, logs: list[dict]) -> None:
        """Record that ``worker`` finished ``done`` steps, the last ``len(logs)`` of them with ``logs``
        (their loss and metrics)."""
        async with self._cond:
            self._max_lead = max(self._max_lead, done - 1 - min(self._done))  # while it ran step done - 1
            self._done[worker] = done
            self._logs.extend(logs)
            self._cond.notify_all()

    async def progress(self) -> dict:
        """Steps done per worker, the steps' logs since the last call, and the largest lead seen."""
        logs, self._logs = self._logs, []
        return {"done": list(self._done), "logs": logs, "max_lead": self._max_lead}
