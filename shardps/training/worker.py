"""The training worker: a model replica plus its own part of the data.

A plain class made into a Ray actor by the trainers. It holds a copy of the
Router, so it talks to the shards directly: the driver is not on the data path.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from contextlib import contextmanager

import ray

REPORT_EVERY_S = 0.1  # ASP: how often a worker reports its finished steps to the clock


class Worker:
    """Computes gradients on its mini-batches against the current shard weights."""

    def __init__(self, index: int, router, build, names: list[str], part, batch_size: int, *, seed: int = 0):
        """``build``: the model function; ``names``: its dense keys as the driver named them;
        ``part``: this worker's data (a ``feed`` part: its ``batches`` are read here)."""
        from shardps.training.replica import Replica  # TensorFlow: only in the worker's process

        self.index = index
        self._router = router
        self._model = Replica(build, names=names, seed=seed)
        self._batches = part.batches(batch_size, seed=seed * 1000 + index)
        self._kept: dict = {}  # a mini-batch read ahead, by index (see _batch)
        self._phase_s: Counter = Counter()  # seconds spent per phase of a step, see :meth:`phases`
        self._steps = 0

    @contextmanager
    def _timed(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phase_s[phase] += time.perf_counter() - start

    def phases(self) -> dict:
        """Where this worker's time went: ``{"steps": n, phase: seconds, ...}``.

        Phases: ``turn`` (waiting for the SSP clock), ``pull`` (waiting for
        weights), ``compute`` (setting the weights, forward, backward,
        gradients to numpy), ``push`` (sending, and waiting while too many are
        unacknowledged).
        """
        return {"steps": self._steps, **self._phase_s}

    def sync_step(self, step: int, replies: list | None = None, ahead: bool = False) -> tuple:
        """Compute on mini-batch ``step``; return ``(logs, output for shard 0, ..., shard S-1)``.

        The weights are ``replies`` (the shards' answers to the pull this
        worker planned in its previous call, as ``Router.push_mean_pull``
        hands them out) or, when None, pulled here. An output is the shard's
        push message or, with ``ahead``, ``(message, request)``: also this
        worker's pull request for mini-batch ``step + 1``, answered in the
        same call as the update (one round trip per step, not two).
        Called with ``num_returns = 1 + num_shards`` so each output becomes
        its own object ref that the driver hands to its shard unopened.
        """
        x, y = self._batch(step)
        with self._timed("pull"):
            if replies is not None:
                plan, needed = self._planned
                weights = (self._router.pulled(plan, replies), needed)
            else:
                weights = self._pull(x).wait()
        dense, rows, logs = self._gradients(x, y, weights)
        with self._timed("push"):
            outputs = self._router.pack(dense, rows)
            if ahead:
                needed = self._model.rows_needed(self._batch(step + 1, keep=True)[0])
                plan = self._router.pull_requests(self._model.names, rows=needed)
                self._planned = (plan, needed)
                outputs = list(zip(outputs, plan.requests))
        self._steps += 1
        return (logs, *outputs)

    def _batch(self, k: int, keep: bool = False) -> tuple:
        """Mini-batch ``k``; ``keep``: read ahead, kept for the step that trains on it (read once, not twice,
        when a step plans the pull of a later one). Reading ``k`` to train on drops batches kept for earlier
        steps (read for a step that failed and is being redone)."""
        batch = self._kept.pop(k, None) or self._batches.batch(k)
        if keep:
            self._kept[k] = batch
        else:
            for stale in [j for j in self._kept if j < k]:
                del self._kept[stale]
        return batch

    def _pull(self, x) -> "Pull":
        """Start pulling what batch ``x`` needs (dense keys and its rows, one message per shard)."""
        needed = self._model.rows_needed(x)
        return Pull(self._router.pull(self._model.names, rows=needed, wait=False), needed)

    def _gradients(self, x, y, pulled: tuple) -> tuple[dict, dict, dict]:
        """Compute on ``(x, y)`` at the ``(weights, rows' ids)`` pulled; return ``(dense grads,
        {table: (ids, grads)}, logs)``."""
        with self._timed("compute"):
            return self._model.compute_gradients(x, y, *pulled)

    def run(self, first: int, steps: int, clock, *, bounded: bool = True, max_inflight: int = 2,
            step_delay: float = 0.0, batch_offset: int = 0, prefetch: bool = False) -> int:
        """Async loop: pull -> compute -> push without a barrier, for steps ``first .. steps - 1``.

        Step ``i`` trains on mini-batch ``batch_offset + i`` (the offset: the
        step a resumed run starts from), so a restarted worker carries on with
        the data it would have seen.

        Before each step asks ``clock`` for permission if the run is
        ``bounded`` (SSP; a round trip per step that ASP skips) and reports
        finished steps with their logs (loss and metrics): SSP after each
        step, ASP every ``REPORT_EVERY_S`` seconds and after the last (a call
        per step cost the clock a sixth of a core), so a replaced ASP worker
        redoes the steps of its last fraction of a second. At most ``max_inflight``
        pushes are unacknowledged at a time; all are acknowledged on return.
        ``prefetch`` (ASP only: it reads weights one step early): the weights
        for step ``i + 2`` are asked for in the same call per shard as step
        ``i``'s push (``Router.push_pull``), so they travel while TensorFlow
        computes step ``i + 1``, and a step costs one call per shard, not
        two; step ``i + 1``'s weights then lack this worker's own push ``i``,
        which the shards count as one more step of staleness.
        ``step_delay`` seconds of extra work per step simulate a slow worker.
        Returns the number of steps done.
        """
        inflight: deque = deque()  # pushes not known to be applied, oldest first
        ahead: deque = deque()  # Pulls sent for the coming steps, in step order
        unreported, reported_at = [], time.perf_counter()
        for step in range(first, steps):
            if bounded:
                with self._timed("turn"):
                    ray.get(clock.wait_turn.remote(self.index, step))
            x, y = self._batch(batch_offset + step)
            with self._timed("pull"):
                if not ahead:  # the first step, or no prefetch
                    ahead.append(self._pull(x))
                if prefetch and len(ahead) == 1 and step + 1 < steps:  # the first step: the next one's pull alone
                    ahead.append(self._pull(self._batch(batch_offset + step + 1, keep=True)[0]))
                weights = ahead.popleft().wait()
            dense, rows, logs = self._gradients(x, y, weights)
            if step_delay:
                time.sleep(step_delay)  # simulated slowness, not synchronisation
            with self._timed("push"):
                if prefetch and step + 2 < steps:
                    needed = self._model.rows_needed(self._batch(batch_offset + step + 2, keep=True)[0])
                    handle = self._router.push_pull(dense, self._model.names, rows=rows, pull_rows=needed, wait=False)
                    ahead.append(Pull(handle, needed))
                else:
                    handle = self._router.push(dense, rows=rows, wait=False)
                inflight.append(handle)
                while len(inflight) > max_inflight:
                    inflight.popleft().wait()
            self._steps += 1
            unreported.append(logs)
            if bounded or step + 1 == steps or time.perf_counter() - reported_at >= REPORT_EVERY_S:
                clock.tick.remote(self.index, step + 1, unreported)
                unreported, reported_at = [], time.perf_counter()
        for handle in inflight:
            handle.wait()
        return steps - first

    def warm_up(self) -> int:
        """Compute gradients on this worker's first batches at the model's initial weights; returns the pid.

        Traces TensorFlow's function before the run's clock starts (what
        Keras does on its first ``fit`` step). Talks to no shard, changes nothing.
        """
        for batch in (0, 0, 1):  # eagerly (builds the loss and metrics), traced, and for any number of rows
            x, y = self._batches.batch(batch)
            self._model.compute_gradients(x, y, *self._model.zero_rows(x))
        return os.getpid()

    def pid(self) -> int:
        """This worker's process id (for monitoring and fault-injection tests)."""
        return os.getpid()


class Pull:
    """A pull on its way: ``wait()`` gives ``(weights, {table: ids})``, what ``Replica.compute_gradients`` takes."""

    def __init__(self, handle, needed: dict):
        self._handle, self._needed = handle, needed

    def wait(self) -> tuple[dict, dict]:
        return self._handle.wait(), self._needed
