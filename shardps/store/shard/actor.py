"""The ParameterShard: a thin dispatcher over the parts that hold and change its state.

A plain class (testable without Ray) that ``launch()`` turns into an actor
with ``ray.remote(ParameterShard).options(...)``, as ``ray.util.queue`` does.
It checks that it is alive, skips pushes it applied before
(:mod:`shardps.store.dedup`), counts, and hands the work to:

- :class:`~shardps.store.shard.dense.DenseStore`: dense keys in flat buffers;
- :class:`~shardps.store.shard.rows.RowStore`: embedding tables' rows;
- :class:`~shardps.store.shard.mirror.Mirror`: the replica, sent every change;
- :mod:`~shardps.store.shard.recovery`: the way back after a crash.

Messages are :mod:`shardps.store.messages`'s. Per-call metadata is one
positional tuple: Ray charges ~0.15 ms for keyword arguments.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

from shardps.store.dedup import AppliedRecord, Tag
from shardps.store.errors import ShardUnavailableError
from shardps.store.messages import push_parts, request_parts
from shardps.store.shard.recovery import from_checkpoint, reconstructed
from shardps.store.shard.dense import DenseStore
from shardps.store.shard.mirror import Mirror
from shardps.store.shard.rows import RowStore

log = logging.getLogger(__name__)


def _node_id() -> str | None:
    """The Ray node this shard runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _fetched(messages: tuple) -> list:
    """``messages`` with any ObjectRef (a large replicated push) replaced by its value."""
    if not any(type(m).__name__ == "ObjectRef" for m in messages):
        return list(messages)
    import ray

    return [ray.get(m) if isinstance(m, ray.ObjectRef) else m for m in messages]


class ParameterShard:
    """Holds a slice of the model and applies pushes with a server-side optimizer.

    Args:
        shard_id: this shard's index (for stats and errors).
        optimizer: an optimizer from :mod:`shardps.store.optim`.
        recovery: ``{"checkpoint_dir", "num_shards", "block_bytes", "store"}``.
            When Ray restarts this actor after a crash (re-running
            ``__init__``), the shard copies its replica if it has one, else
            reloads its part of the latest checkpoint (updates applied after
            it are lost). With neither it comes back empty and every call
            raises :class:`ShardUnavailableError`.
        replica: a ``ParameterShard`` actor that mirrors this one, or its
            name (see :mod:`shardps.store.shard.mirror`). A push goes to the
            replica before it is checked here, so both work at once; a
            malformed one is rejected by both, changing nothing.
        is_replica: this actor is another shard's replica. Restarted by Ray,
            it refuses everything until its shard sends it the state.
    """

    def __init__(self, shard_id: int, optimizer, *, recovery: dict | None = None, replica=None,
                 is_replica: bool = False):
        self.shard_id = shard_id
        self._optimizer = optimizer
        self._dense = DenseStore(optimizer.slots())
        self._rows = RowStore()
        self._version = 0  # pushes applied so far
        self._applied = AppliedRecord()  # which (client, seq) pushes were applied: exactly once
        self._pushes = 0
        self._pulls = 0
        self._staleness: Counter[int] = Counter()  # staleness -> pushes, when the client says
        self._mirror = None if replica is None else Mirror(replica, shard_id)
        self._blank = is_replica and reconstructed()  # a restarted replica, waiting for adopt()
        self._restarted = recovery is not None and reconstructed()
        self._restored_step: int | None = None
        self._restored_from: str | None = None
        self._lost_because = "no usable checkpoint or replica"
        if self._restarted:
            self._recover(recovery)

    def _recover(self, settings: dict) -> None:
        """After a restart: take the replica's state, else this shard's part of the latest checkpoint."""
        saved = self._mirror.fetch() if self._mirror is not None else None
        if saved is not None:
            self._load(*saved)
            self._restored_from = "replica"
            log.warning("shard %d restarted from its replica: nothing was lost", self.shard_id)
            return
        found = from_checkpoint(self.shard_id, **settings)
        if isinstance(found, str):
            self._lost_because = found
            log.error("shard %d restarted and cannot recover: %s", self.shard_id, found)
            return
        self._load(found.dense, found.meta, found.tables)
        self._restored_step, self._restored_from = found.step, "checkpoint"
        self._rows.lost = f"shard {self.shard_id} restarted from the checkpoint at step {found.step}"
        if self._mirror is not None:
            self._mirror.in_sync = False  # the replica has other state: the next change sends it this
        log.warning("shard %d restarted from the checkpoint at step %d", self.shard_id, found.step)

    def _check_alive(self) -> None:
        if self._restarted and self._restored_from is None:
            raise ShardUnavailableError(f"shard {self.shard_id} restarted and its parameters are lost: "
                                        f"{self._lost_because}")
        if self._blank:
            raise ShardUnavailableError(f"replica of shard {self.shard_id} restarted and has no state yet")

    def _load(self, dense: dict, meta: dict, tables: dict | None = None) -> None:
        """Replace everything held by what :meth:`export` gives."""
        self._dense.load(dense)
        self._rows.load(tables or {})
        self._version = int(meta["version"])
        self._applied = AppliedRecord.from_json(meta["applied"])

    def _changed(self, method: str, *args) -> None:
        """A change was just made here: make it on the replica too; blocks until it has."""
        if self._mirror is not None:
            self._mirror.wait(self._mirror.send(method, *args), self.export)

    def _checked(self, work, *args):
        """``work(*args)``, its ``ValueError`` naming this shard."""
        try:
            return work(*args)
        except ValueError as exc:
            raise ValueError(f"shard {self.shard_id}: {exc}") from None

    # ---- register ----------------------------------------------------------
    def register(self, message: dict) -> None:
        """Append new segments (a register message). Raises ``ValueError``.

        Idempotent: a message whose keys this shard already holds (a call
        re-sent after a restart from the replica) changes nothing.
        """
        self._check_alive()
        if self._checked(self._dense.register, message):
            self._changed("register", message)

    def register_table(self, spec: dict) -> None:
        """Hold rows of a new table (:meth:`TableSpec.for_shard`'s dict). Raises ``ValueError``.

        Idempotent: the same spec again (a re-sent call) changes nothing; another spec for the name is refused.
        """
        self._check_alive()
        if self._checked(self._rows.register, spec):
            self._changed("register_table", spec)

    def load_table(self, name: str, rows: dict) -> None:
        """Replace table ``name``'s rows here (restore). Raises ``KeyError``/``ValueError``."""
        self._check_alive()
        self._checked(self._rows.load_rows, name, rows)
        self._changed("load_table", name, rows)

    def load_state(self, message: dict) -> None:
        """Replace optimizer state: ``{dtype: ({slot: data}, steps per segment)}``. Raises ``ValueError``."""
        self._check_alive()
        self._checked(self._dense.load_state, message)
        self._changed("load_state", message)

    # ---- push / pull ---------------------------------------------------------
    def push(self, packet: tuple) -> int:
        """Apply one push: ``packet = (tag, message)``; see :meth:`push_mean`.

        One argument, not two: Ray charges per argument (~0.05 ms each).
        """
        tag, message = packet
        return self.push_mean(tag, message)

    def push_mean(self, tag: tuple | None, *messages) -> int:
        """Apply the mean of one or more push messages (sync mode sends W) as one update.

        ``tag``: a :class:`~shardps.store.dedup.Tag` (or its fields as a
        tuple, or None). A push whose (client, seq) was applied before is a
        re-send and is skipped (exactly once). A message may also come as an
        ObjectRef (a large push to a replicated shard): the ref goes on to
        the replica unopened, so both fetch the data at once.

        Blocks until the replica (if any) applied the push too. Returns the
        shard version after the push. Raises ``ValueError`` for a malformed
        message, before anything changes; :class:`ShardUnavailableError`
        when this shard lost keys the client knows (restarted from a
        checkpoint older than them).
        """
        self._check_alive()
        tag = Tag(*tag) if tag else Tag()
        self._check_segments(tag.segments)
        if tag.client is not None and not self._applied.is_new(tag.client, tag.seq, tag.floor):
            return self._version
        # the replica works while this shard does; should the message be malformed, it rejects it too
        pending = None if self._mirror is None else self._mirror.send("push_mean", tuple(tag), *messages)
        fetched = _fetched(messages)
        if not fetched:
            raise ValueError("push needs at least one message")
        parts = [self._checked(push_parts, m) for m in fetched]  # None parts: a sync worker with nothing here
        rows = self._checked(self._rows.plan, [r for _, r in parts], len(parts))  # all checked before any change
        dense = self._checked(self._dense.plan, [d for d, _ in parts if d])
        self._dense.apply(self._optimizer, dense)
        self._rows.apply(rows)
        if tag.client is not None:
            self._applied.add(tag.client, tag.seq)
        if tag.base_version is not None:
            self._staleness[max(0, self._version - tag.base_version)] += 1  # < 0 only after a restore
        self._version += 1
        self._pushes += 1
        if self._mirror is not None:
            self._mirror.wait(pending, self.export)
        return self._version

    def push_mean_refs(self, tag: tuple | None, refs: list) -> int:
        """:meth:`push_mean` of messages given as ObjectRefs, fetched here (inside a list Ray does not resolve
        them): sync training on replicated shards, the refs go on to the replica unopened."""
        return self.push_mean(tag, *refs)

    def push_mean_pull(self, tag: tuple | None, *pairs) -> tuple[int, list]:
        """Sync training: :meth:`push_mean` of the workers' messages, then each worker's pull for its next step.

        ``pairs``: per worker ``(message, request)`` (either may be None).
        Returns ``(version, [(version, answer) or None per worker])``, the
        answers as :meth:`pull` gives them, every one after this update.
        Raises as :meth:`push_mean`, and ``ValueError`` for a malformed request (the update then stands).
        """
        version = self.push_mean(tag, *[message for message, _ in pairs])
        segments = Tag(*tag).segments if tag else None
        return version, [None if request is None else self.pull((segments, request)) for _, request in pairs]

    def pull(self, packet: tuple = (None, None)) -> tuple[int, tuple]:
        """Current values: ``packet = (segments, request)`` -> ``(version, (dense, rows))``.

        ``segments``: how many key segments the client expects this shard to hold (``None``: not checked).
        """
        self._check_alive()
        expected, request = packet
        self._check_segments(expected)
        dense, rows = self._checked(request_parts, request)
        answer = (self._dense.answer(dense), self._rows.answer(rows))
        self._pulls += 1
        return self._version, answer

    def push_pull(self, packet: tuple) -> tuple[int, tuple]:
        """``packet = (tag, message, request)``: push ``message`` (if any), then pull ``request`` (if any)."""
        tag, message, request = packet
        if message is not None:
            self.push_mean(tag, message)
        segments = Tag(*tag).segments if tag else None
        return self.pull((segments, request)) if request is not None else (self._version, ({}, {}))

    def _check_segments(self, expected: int | None) -> None:
        """Raise if this shard holds fewer segments than the client expects (``None``: not checked).

        More is fine: a Router copy made before later registrations knows fewer keys.
        """
        held = self._dense.segments
        if expected is None or held >= expected:
            return
        if self._restored_from == "checkpoint":
            raise ShardUnavailableError(
                f"shard {self.shard_id} restarted from the checkpoint at step {self._restored_step}, which lacks "
                f"{expected - held} of its key segments (registered after that save): their parameters are lost")
        raise ValueError(f"shard {self.shard_id} holds {held} key segments but the router expects {expected}: "
                         "was a key registered by another store or a Router copy?")

    # ---- state and replication -------------------------------------------------
    def export(self) -> tuple[dict, dict, dict]:
        """Everything this shard holds: ``({dtype: SegmentState}, meta, tables)``.

        ``meta`` is ``{"version", "applied"}`` (the applied-push record as
        JSON), so a restarted shard keeps skipping pushes it had applied;
        ``tables`` is :meth:`RowStore.export`'s.
        """
        self._check_alive()
        return self._dense.export(), {"version": self._version, "applied": self._applied.to_json()}, self._rows.export()

    _MIRRORED = ("register", "push_mean", "load_state", "register_table", "load_table")

    def replicate(self, method: str, args: tuple) -> bool:
        """On a replica: apply a change its shard just made. False if this replica restarted and needs :meth:`adopt`."""
        if method not in self._MIRRORED:
            raise ValueError(f"cannot replicate {method!r}")
        if self._blank:
            return False
        getattr(self, method)(*args)
        return True

    def adopt(self, dense: dict, meta: dict, tables: dict | None = None) -> None:
        """On a replica: replace everything with its shard's :meth:`export`."""
        self._blank = False
        self._load(dense, meta, tables)

    def stats(self) -> dict:
        """Counters: keys, segments, bytes, tables, pushes, pulls, version, staleness; where it runs; recoveries.

        ``restored_from``: ``"replica"`` (nothing lost) or ``"checkpoint"``
        (pushes after ``restored_step`` lost) after a restart. ``replica``:
        ``"ok"``, ``"lost"`` or None (no replica).
        """
        return {
            "shard": self.shard_id, "keys": self._dense.keys, "segments": self._dense.segments,
            "bytes": self._dense.nbytes, "tables": self._rows.stats(),
            "pushes": self._pushes, "pulls": self._pulls, "version": self._version,
            "staleness": dict(self._staleness), "pid": os.getpid(), "node": _node_id(),
            "restarted": self._restarted, "restored_from": self._restored_from,
            "restored_step": self._restored_step,
            "replica": None if self._mirror is None else self._mirror.state,
            "resyncs": 0 if self._mirror is None else self._mirror.resyncs,
        }

    def ping(self) -> None:
        """Do nothing (liveness checks; Ray's round-trip floor in benchmarks)."""

    def ping_back(self, payload):
        """Return ``payload`` (Ray's floor for a call that carries data both ways)."""
        return payload

