"""Handles: remote calls in flight to shards, and the one way to wait for them.

Re-sending a call to a shard that Ray restarted is Ray's job: shards are
created with ``max_task_retries``, so Ray sends the call again as soon as the
shard is back, whether or not anybody waits on it (at least once); the
shard's record of applied pushes makes that exactly once (:mod:`shardps.store.dedup`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from shardps.store.errors import ShardUnavailableError


class Handle:
    """A push or pull in flight. ``wait()`` is the one way to finish it.

    ``refs``: one ObjectRef per shard call; ``finish(replies)`` makes the
    result; ``on_done()`` runs once when every call has its final answer
    (the Router then knows this push can no longer arrive at a shard).
    """

    def __init__(self, refs: list, finish: Callable[[list], Any], *, on_done: Callable[[], None] | None = None):
        self._refs = refs
        self._finish = finish
        self._on_done = on_done
        self._result = None
        self._done = False

    def wait(self, timeout: float | None = None):
        """Block until every shard answered; return the operation's result.

        Raises:
            TimeoutError: not all shards answered within ``timeout`` seconds
                (``None`` waits forever); the operation may still complete,
                and ``wait()`` may be called again.
            ShardUnavailableError: a shard died and did not come back (or
                came back without its parameters).
            ValueError: a shard rejected the call (a Router copy out of date).
        """
        if self._done:
            return self._result
        try:
            replies = gather(self._refs, timeout)
        except TimeoutError:
            raise
        except BaseException:
            self._finished()
            raise
        self._finished()
        self._result = self._finish(replies)
        self._done = True
        return self._result

    def then(self, f: Callable[[Any], Any]) -> "Handle":
        """This handle, its result now ``f(result)`` (call before :meth:`wait`). Does not block."""
        finish = self._finish
        self._finish = lambda replies: f(finish(replies))
        return self

    def ready(self) -> bool:
        """True when every call has its final answer (``wait()`` will not block). Does not block."""
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0, fetch_local=False)
        return len(ready) == len(self._refs)

    def _finished(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


RESTART_TIMEOUT_S = 120.0  # how long a restarting actor may take (process start + checkpoint load)


def wait_alive(method, timeout: float | None = RESTART_TIMEOUT_S) -> None:
    """Block until the actor behind ``method`` (e.g. ``shard.ping``) answers a call.

    While Ray restarts an actor, calls to it fail at once with
    ``ActorUnavailableError``; this retries every 0.2 s.

    Raises:
        ShardUnavailableError: the actor is dead for good.
        TimeoutError: it did not answer within ``timeout`` seconds (``None``: waits forever).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            ray.get(method.remote(), timeout=_left(deadline))
            return
        except ActorUnavailableError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"actor not back within {timeout} s: {exc}") from exc
            time.sleep(0.2)  # polling a restart in progress
        except GetTimeoutError as exc:
            raise TimeoutError(f"actor did not answer within {timeout} s") from exc
        except RayActorError as exc:
            raise ShardUnavailableError(f"actor is gone: {exc}") from exc


def gather(refs: list, timeout: float | None = None) -> list:
    """`ray.get` with shardps errors: TimeoutError, ShardUnavailableError."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError as exc:
        raise TimeoutError(f"shards did not answer within {timeout} s") from exc
    except RayActorError as exc:
        raise ShardUnavailableError(f"a parameter shard is unavailable: {exc}") from exc
