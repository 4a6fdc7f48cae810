"""The replica protocol, on the shard's side: every change goes to the replica before it is acknowledged.

With ``launch(replicas=2)`` each shard has a replica actor (on another node
where there is one). A change (register, push, optimizer state, tables) is
applied by the shard and sent to the replica, which applies changes in the
order sent; the shard acknowledges only once the replica has applied it too,
so an acknowledged push survives the death of either of them.

The replica's states, as :attr:`Mirror.state` names them:

- ``"ok"``: in step; each change is sent as it is made.
- out of sync (``in_sync`` False): it restarted blank, or this shard was
  restored from a checkpoint; the next change sends it the whole state
  (``adopt``) instead, then it is ``"ok"`` again.
- ``"lost"``: gone for good (not back within the restart timeout); the
  shard runs on without one (logged).
"""
from __future__ import annotations

import logging
from typing import Callable

from shardps.store.errors import ShardUnavailableError

log = logging.getLogger(__name__)


class Mirror:
    """This shard's link to its replica. ``replica``: an actor handle, or the name to look it up by (Ray
    warns about restartable actors whose constructor receives actor handles)."""

    def __init__(self, replica, shard_id: int):
        if isinstance(replica, str):
            import ray  # only shards with a replica run inside Ray

            replica = ray.get_actor(replica)
        self._replica = replica
        self.shard_id = shard_id
        self.state = "ok"
        self.in_sync = True
        self.resyncs = 0  # whole-state copies sent to a restarted replica

    def fetch(self):
        """The replica's whole state (its ``export()``), or None when it has none (died, or restarted blank)."""
        import ray
        from ray.exceptions import RayError

        try:
            return ray.get(self._replica.export.remote())
        except RayError as exc:
            log.error("shard %d restarted and its replica has no state (%s)", self.shard_id, type(exc).__name__)
            return None

    def send(self, method: str, *args):
        """Start the same change on the replica; returns what :meth:`wait` takes (None: nothing was sent)."""
        if self._replica is None or not self.in_sync:
            return None
        return self._replica.replicate.remote(method, args)

    def wait(self, pending, export: Callable[[], tuple]) -> None:
        """Block until the replica applied ``pending``; call it after the change was made here too.

        A replica that failed, restarted blank or is out of sync is sent
        ``export()`` (this shard's whole state) instead; one that does not
        come back is dropped (logged, :attr:`state` ``"lost"``).
        """
        if self._replica is None:
            return
        import ray
        from ray.exceptions import RayError

        from shardps.store.handle import wait_alive

        try:
            if pending is not None and ray.get(pending):
                return
        except RayError as exc:
            log.warning("replica of shard %d failed (%s): sending it the whole state", self.shard_id,
                        type(exc).__name__)
        try:
            wait_alive(self._replica.ping)
            ray.get(self._replica.adopt.remote(*export()))
            self.resyncs += 1
            self.in_sync = True
        except (RayError, ShardUnavailableError, TimeoutError) as exc:
            log.error("shard %d lost its replica for good (%s): running without one", self.shard_id, exc)
            self._replica, self.state = None, "lost"
