"""Handles: remote calls in flight to shards, and the one way to wait for them.

A :class:`Handle` keeps, for each call, a function that (re)issues it, so
when a shard dies and Ray restarts it the call is sent again, with the same
(client, sequence number): the shard applies it at most once.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from shardps.errors import ShardUnavailableError

class Handle:
    """A push or pull in flight. ``wait()`` is the one way to finish it.

    Each call is kept as a function that (re)issues it, so when a shard dies
    and Ray restarts it, ``wait()`` re-sends that shard's call with the same
    (client, sequence number): the shard applies it at most once.
    """

    def __init__(self, calls: list[tuple[Any, Callable[[], Any]]], finish: Callable[[list], Any], *,
                 retries: int = 0):
        self._calls = calls  # (shard actor, issue the call -> ObjectRef)
        self._refs = [issue() for _, issue in calls]
        self._finish = finish
        self._retries = retries
        self._result = None
        self._done = False

    def wait(self, timeout: float | None = None):
        """Block until every shard answered; return the operation's result.

        Raises:
            TimeoutError: not all shards answered within ``timeout`` seconds
                (``None`` waits forever); the operation may still complete.
            ShardUnavailableError: a shard died and did not come back (or
                came back without its parameters).
        """
        if self._done:
            return self._result
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in itertools.count():
            try:
                replies = gather(self._refs, _left(deadline))
                break
            except ShardUnavailableError:
                if attempt >= self._retries:
                    raise
                for i, (shard, issue) in enumerate(self._calls):
                    if _failed(self._refs[i]):
                        wait_alive(shard.ping, _left(deadline))
                        self._refs[i] = issue()
        self._result = self._finish(replies)
        self._done = True
        return self._result

    def done(self) -> bool:
        """True when every shard has answered (``wait()`` will not block)."""
        ready, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        return len(ready) == len(self._refs)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _failed(ref) -> bool:
    """True if ``ref``'s call failed because its actor died."""
    try:
        ray.get(ref, timeout=0)
    except RayActorError:
        return True
    except Exception:  # still running, or an ordinary error: not a lost call
        return False
    return False


RESTART_TIMEOUT_S = 120.0  # how long a restarting actor may take (process start + checkpoint load)


def wait_alive(method, timeout: float | None = RESTART_TIMEOUT_S) -> None:
    """Block until the actor behind ``method`` (e.g. ``shard.ping``) answers a call.

    While Ray restarts an actor, calls to it fail at once with
    ``ActorUnavailableError``; this retries every 0.2 s.

    Raises:
        ShardUnavailableError: the actor is dead for good, or not back within ``timeout`` seconds.
    """
    deadline = time.monotonic() + (RESTART_TIMEOUT_S if timeout is None else timeout)
    while True:
        try:
            ray.get(method.remote(), timeout=_left(deadline))
            return
        except ActorUnavailableError as exc:
            if time.monotonic() >= deadline:
                raise ShardUnavailableError(f"actor not back within {timeout} s: {exc}") from exc
            time.sleep(0.2)  # polling a restart in progress
        except (RayActorError, GetTimeoutError) as exc:
            raise ShardUnavailableError(f"actor is gone: {exc}") from exc


def gather(refs: list, timeout: float | None = None) -> list:
    """`ray.get` with shardps errors: TimeoutError, ShardUnavailableError."""
    try:
        return ray.get(refs, timeout=timeout)
    except GetTimeoutError as exc:
        raise TimeoutError(f"shards did not answer within {timeout} s") from exc
    except RayActorError as exc:
        raise ShardUnavailableError(f"a parameter shard is unavailable: {exc}") from exc
