"""The training worker: a model replica plus its own part of the data.

A plain class made into a Ray actor by the trainers. It holds a copy of the
Router, so it talks to the shards directly: the driver is not on the data path.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from contextlib import contextmanager

import numpy as np
import ray

from shardps.training.data import Batches
from shardps.training.models import build_model


class Worker:
    """Computes gradients on its mini-batches against the current shard weights."""

    def __init__(self, index: int, router, model: str, input_shape, num_classes: int, data: list,
                 batch_size: int, *, seed: int = 0, embedding_dim: int = 16):
        """``data``: ``[ObjectRef of x, ObjectRef of y]``, fetched here.

        Nested in a list, Ray does not count them as constructor arguments in
        its object store (which it warns about for restartable actors); the
        driver keeps them alive for restarts.
        """
        self.index = index
        self._router = router
        self._model = build_model(model, input_shape, num_classes, seed=seed, embedding_dim=embedding_dim)
        x, y = ray.get(data)
        self._batches = Batches(x, y, batch_size, seed=seed * 1000 + index)
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
        weights), ``set_weights``, ``compute`` (forward, backward, gradients to
        numpy), ``push`` (sending, and waiting while too many are unacknowledged).
        """
        return {"steps": self._steps, **self._phase_s}

    def sync_step(self, step: int) -> tuple:
        """Pull, compute on mini-batch ``step``; return ``(loss, message for shard 0, ..., shard S-1)``.

        Called with ``num_returns = 1 + num_shards`` so each message becomes
        its own object ref that the driver hands to its shard unopened.
        """
        x, y = self._batches.batch(step)
        with self._timed("pull"):
            weights = self._pull(x).wait()
        dense, rows, loss = self._gradients(x, y, weights)
        with self._timed("push"):
            messages = self._router.pack(dense, rows)
        self._steps += 1
        return (loss, *messages)

    def _pull(self, x):
        """Start pulling what batch ``x`` needs (dense keys and its rows, one message per shard): a Handle."""
        return self._router.pull(self._model.names, rows=self._model.rows_needed(x), wait=False)

    def _gradients(self, x, y, weights: dict) -> tuple[dict, dict, float]:
        """Compute on ``(x, y)`` at ``weights``; return ``(dense grads, {table: (ids, grads)}, loss)``."""
        with self._timed("set_weights"):
            self._model.set_weights(weights)
        with self._timed("compute"):
            grads, loss = self._model.compute_gradients(x, y)
        rows = {name: grads.pop(name) for name in self._model.tables}
        return grads, rows, loss

    def run(self, first: int, steps: int, clock, *, bounded: bool = True, max_inflight: int = 2,
            step_delay: float = 0.0, batch_offset: int = 0, prefetch: bool = False) -> int:
        """Async loop: pull -> compute -> push without a barrier, for steps ``first .. steps - 1``.

        Step ``i`` trains on mini-batch ``batch_offset + i`` (the offset: the
        step a resumed run starts from), so a restarted worker carries on with
        the data it would have seen.

        Before each step asks ``clock`` for permission if the run is
        ``bounded`` (SSP; a round trip per step that ASP skips) and reports
        each finished step with its loss. At most ``max_inflight``
        pushes are unacknowledged at a time; all are acknowledged on return.
        ``prefetch`` (ASP only: it reads weights one step early): the pull for
        step ``i + 1`` is sent before step ``i``'s gradient is computed, so it
        travels while TensorFlow works; its weights then lack this worker's
        own push ``i``, which the shards count as one more step of staleness.
        ``step_delay`` seconds of extra work per step simulate a slow worker.
        Returns the number of steps done.
        """
        inflight: deque = deque()
        ahead = None  # the pull already sent for this step
        for step in range(first, steps):
            if bounded:
                with self._timed("turn"):
                    ray.get(clock.wait_turn.remote(self.index, step))
            x, y = self._batches.batch(batch_offset + step)
            with self._timed("pull"):
                weights = (ahead if ahead is not None else self._pull(x)).wait()
            if prefetch and step + 1 < steps:
                ahead = self._pull(self._batches.batch(batch_offset + step + 1)[0])
            else:
                ahead = None
            dense, rows, loss = self._gradients(x, y, weights)
            if step_delay:
                time.sleep(step_delay)  # simulated slowness, not synchronisation
            with self._timed("push"):
                inflight.append(self._router.push(dense, rows=rows, wait=False))
                while len(inflight) > max_inflight:
                    inflight.popleft().wait()
            self._steps += 1
            clock.tick.remote(self.index, step + 1, loss)
        for handle in inflight:
            handle.wait()
        return steps - first

    def warm_up(self) -> int:
        """Compute one gradient on this worker's first batch at the model's initial weights; returns the pid.

        Traces TensorFlow's function before the run's clock starts (what
        Keras does on its first ``fit`` step). Talks to no shard, changes nothing.
        """
        x, y = self._batches.batch(0)
        rows = {name: np.zeros((len(ids), self._model.tables[name]), np.float32)
                for name, ids in self._model.rows_needed(x).items()}
        self._model.set_weights({**self._model.get_weights(), **rows})
        self._model.compute_gradients(x, y)
        return os.getpid()

    def pid(self) -> int:
        """This worker's process id (for monitoring and fault-injection tests)."""
        return os.getpid()
