"""The training worker: a model replica plus its own part of the data.

A plain class made into a Ray actor by the trainers. It holds a copy of the
Router, so it talks to the shards directly: the driver is not on the data path.
"""
from __future__ import annotations

import os
import time
from collections import deque

import ray

from shardps.data import Batches
from shardps.models import build_model


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

    def sync_step(self, step: int) -> tuple:
        """Pull, compute on mini-batch ``step``; return ``(loss, message for shard 0, ..., shard S-1)``.

        Called with ``num_returns = 1 + num_shards`` so each message becomes
        its own object ref that the driver hands to its shard unopened.
        """
        x, y = self._batches.batch(step)
        dense, rows, loss = self._gradients(x, y, self._pull(x).wait())
        return (loss, *self._router.pack(dense, rows))

    def _pull(self, x):
        """Start pulling what batch ``x`` needs (dense keys and its rows, one message per shard): a Handle."""
        return self._router.pull(self._model.names, rows=self._model.rows_needed(x), wait=False)

    def _gradients(self, x, y, weights: dict) -> tuple[dict, dict, float]:
        """Compute on ``(x, y)`` at ``weights``; return ``(dense grads, {table: (ids, grads)}, loss)``."""
        self._model.set_weights(weights)
        grads, loss = self._model.compute_gradients(x, y)
        rows = {name: grads.pop(name) for name in self._model.tables}
        return grads, rows, loss

    def run(self, first: int, steps: int, clock, *, max_inflight: int = 2, step_delay: float = 0.0,
            batch_offset: int = 0, prefetch: bool = False) -> int:
        """Async loop: pull -> compute -> push without a barrier, for steps ``first .. steps - 1``.

        Step ``i`` trains on mini-batch ``batch_offset + i`` (the offset: the
        step a resumed run starts from), so a restarted worker carries on with
        the data it would have seen.

        Before each step asks ``clock`` for permission (the SSP bound, if any)
        and reports each finished step with its loss. At most ``max_inflight``
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
            ray.get(clock.wait_turn.remote(self.index, step))
            x, y = self._batches.batch(batch_offset + step)
            weights = (ahead if ahead is not None else self._pull(x)).wait()
            if prefetch and step + 1 < steps:
                ahead = self._pull(self._batches.batch(batch_offset + step + 1)[0])
            else:
                ahead = None
            dense, rows, loss = self._gradients(x, y, weights)
            if step_delay:
                time.sleep(step_delay)  # simulated slowness, not synchronisation
            inflight.append(self._router.push(dense, rows=rows, wait=False))
            while len(inflight) > max_inflight:
                inflight.popleft().wait()
            clock.tick.remote(self.index, step + 1, loss)
        for handle in inflight:
            handle.wait()
        return steps - first

    def pid(self) -> int:
        """This worker's process id (for monitoring and fault-injection tests)."""
        return os.getpid()
