"""The ParameterShard: flat parameter buffers plus optimizer state.

A plain class (testable without Ray) that ``launch()`` turns into an actor
with ``ray.remote(ParameterShard).options(...)``, as ``ray.util.queue`` does.

The shard keeps one flat buffer per dtype. Each key it holds is one
*segment* (a contiguous range) of that buffer, in registration order; the
router sends data for a run of segments as one packed array, so an update is
a handful of vectorised numpy expressions over buffer slices, never a Python
loop over keys.

Messages (built by the router):
- register: ``{dtype: (keys, sizes, data)}`` appends one segment per key;
- push:     ``{dtype: (segment_ids or None, data)}``; ``None`` means all segments;
            plus ``{ROWS: {table: (unique ids, grads)}}`` for embedding rows;
- pull:     ``{dtype: segment_ids or None}``, answered with ``{dtype: data}``;
            plus ``{ROWS: {table: ids}}``, answered with ``{ROWS: {table: rows}}``.

Arrays, ids included, travel as :mod:`shardps.store.wire` encodes them (bytes when small). Per-call
metadata is one positional tuple: Ray charges ~0.15 ms for keyword arguments.

Recovery after Ray restarts a crashed shard (its ``__init__`` runs again,
empty): from its replica if it has one (``launch(replicas=2)``: nothing
lost), else from the latest checkpoint (what came after it is lost).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from shardps.store import checkpoint, update
from shardps.store.dedup import AppliedRecord, Tag
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.errors import ShardUnavailableError
from shardps.store.optim import optimizer_from_config
from shardps.store.placement import HashPartitioner, Layout, SegmentState
from shardps.store.ids import as_ids
from shardps.store.initializers import initializer_from_config
from shardps.store.placement import rows_per_shard, shard_of_ids
from shardps.store.wire import ROWS, from_wire, one_array, rows_from_wire, split, to_wire

log = logging.getLogger(__name__)


def _node_id() -> str | None:
    """The Ray node this shard runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _reconstructed() -> bool:
    """True inside an actor that Ray restarted after a crash."""
    import warnings

    import ray

    with warnings.catch_warnings():  # Ray 2.60 warns from inside its own implementation of this property
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed


class _Group:
    """One dtype's buffer, optimizer state and per-segment bookkeeping."""

    def __init__(self, dtype: np.dtype, slots: tuple[str, ...]):
        self.dtype = np.dtype(dtype)
        self.keys: list[str] = []  # one segment per key, in buffer order
        self.params = np.empty(0, self.dtype)
        self.state = {name: np.empty(0, self.dtype) for name in slots}
        self.offsets = np.empty(0, np.int64)
        self.sizes = np.empty(0, np.int64)
        self.steps = np.empty(0, np.int64)  # updates applied per segment (Adam's t)

    def append(self, keys: list[str], sizes: list[int], data: np.ndarray) -> None:
        self.keys += keys
        sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([self.offsets, len(self.params) + np.cumsum(sizes) - sizes])
        self.sizes = np.concatenate([self.sizes, sizes])
        self.steps = np.concatenate([self.steps, np.zeros(len(sizes), np.int64)])
        self.params = np.concatenate([self.params, data.astype(self.dtype)])
        for name in self.state:
            self.state[name] = np.concatenate([self.state[name], np.zeros(len(data), self.dtype)])

    def check_ids(self, ids) -> np.ndarray:
        """Validated segment ids (all when ``None``); raises ``ValueError``."""
        if ids is None:
            return np.arange(len(self.sizes))
        ids = np.asarray(from_wire(ids, np.int64), np.int64)
        if ids.ndim != 1 or (ids.size and (ids[0] < 0 or ids[-1] >= len(self.sizes))) or np.any(np.diff(ids) <= 0):
            raise ValueError(f"segment ids must be increasing and below {len(self.sizes)}")
        return ids

    def runs(self, ids: np.ndarray, by_step: bool):
        """Maximal runs of ids contiguous in the buffer (and of equal step if asked).

        Yields ``(ids of the run, buffer start, buffer stop, data start)``.
        """
        off, size = self.offsets[ids], self.sizes[ids]
        split = off[1:] != off[:-1] + size[:-1]
        if by_step:
            step = self.steps[ids]
            split |= step[1:] != step[:-1]
        bounds = np.concatenate([[0], np.flatnonzero(split) + 1, [len(ids)]])
        data_at = np.concatenate([[0], np.cumsum(size)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                yield ids[a:b], int(off[a]), int(off[b - 1] + size[b - 1]), int(data_at[a])


def _tables_of_shard(entries: list[dict], rows: dict, shard: int, num_shards: int) -> dict:
    """From a checkpoint's tables: this shard's rows of each, with its spec (as :meth:`ParameterShard.export`)."""
    out = {}
    for entry in entries:
        name, all_rows = entry["name"], rows[entry["name"]]
        mine = shard_of_ids(all_rows["ids"], name, num_shards) == shard
        spec = {k: entry[k] for k in ("name", "dim", "dtype", "initializer", "optimizer", "seed", "min_count")}
        spec["max_rows"] = rows_per_shard(entry["max_rows"], num_shards)
        out[name] = {"spec": spec, "rows": {k: (v if k == "counts" else v[mine]) for k, v in all_rows.items()}}
    return out


def _gradient(parts: list[np.ndarray]):
    """One message's gradient for a piece, or the tuple of several (sync mode: ``update`` applies their mean)."""
    return parts[0] if len(parts) == 1 else tuple(parts)


def _dense_part(message: dict | None) -> dict:
    """A push message's dense groups ``{dtype: (ids, data)}``, without its table rows."""
    return {k: v for k, v in (message or {}).items() if k != ROWS}


def _answer(group: _Group, ids) -> object:
    """The wire form of the values of segments ``ids`` (None: all), as :func:`join` would send them: one view
    per segment, or (one, small or many segments) their contiguous runs in one array, packed only when
    several. Ray serialises it on return: no aliasing."""
    everything, ids = ids is None, group.check_ids(ids)
    if not one_array(int(group.sizes[ids].sum()) * group.dtype.itemsize, len(ids)):
        return [group.params[o:o + n] for o, n in zip(group.offsets[ids].tolist(), group.sizes[ids].tolist())]
    if everything:  # one run: the whole buffer
        return to_wire(group.params)
    runs = [group.params[lo:hi] for _, lo, hi, _ in group.runs(ids, by_step=False)]
    return to_wire(runs[0] if len(runs) == 1 else np.concatenate(runs))


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
        recovery: ``{"checkpoint_dir", "num_shards", "block_bytes"}``. When
            Ray restarts this actor after a crash (re-running ``__init__``),
            the shard copies the state of its replica if it has one, else
            reloads its own part of the latest checkpoint (updates applied
            after that checkpoint are lost). With neither it comes back
            empty and every call raises :class:`ShardUnavailableError`.
        replica: a ``ParameterShard`` actor that mirrors this one, or the
            name of one (looked up here: Ray warns about restartable actors
            whose constructor receives actor handles). Every
            change (register, push, optimizer state) is applied here and sent
            to the replica (which applies changes in the order sent), and
            acknowledged only once the replica has applied it too; so an
            acknowledged push survives the death of either of them. A push
            goes to the replica before it is checked here, so both work at
            once; a malformed one is rejected by both, changing nothing.
            A replica that died and restarted is sent this shard's whole
            state; one that is gone for good is dropped (logged, and
            ``stats()["replica"]`` says ``"lost"``).
        is_replica: this actor is another shard's replica. Restarted by Ray,
            it refuses everything until its shard sends it the state.
    """

    def __init__(self, shard_id: int, optimizer, *, recovery: dict | None = None, replica=None,
                 is_replica: bool = False):
        self.shard_id = shard_id
        self._optimizer = optimizer
        self._groups: dict[str, _Group] = {}
        self._tables: dict[str, EmbeddingTable] = {}  # embedding tables' rows held here, by table name
        self._table_specs: dict[str, dict] = {}  # what register_table received, by table name
        self._version = 0  # pushes applied so far
        self._applied = AppliedRecord()  # which (client, seq) pushes were applied: exactly once
        self._pushes = 0
        self._pulls = 0
        self._staleness: Counter[int] = Counter()  # staleness -> pushes, when the client says
        if isinstance(replica, str):
            import ray

            replica = ray.get_actor(replica)
        self._replica = replica
        self._replica_state = None if replica is None else "ok"
        self._resyncs = 0  # whole-state copies sent to a restarted replica
        self._replica_in_sync = True  # False: the next change sends the replica everything
        self._blank = is_replica and _reconstructed()  # a restarted replica, waiting for adopt()
        self._restarted = recovery is not None and _reconstructed()
        self._restored_step: int | None = None
        self._restored_from: str | None = None
        self._lost_because = "no usable checkpoint or replica"
        if self._restarted and not self._copy_replica():
            self._recover(**recovery)

    def _copy_replica(self) -> bool:
        """After a restart: take the replica's state (every acknowledged push). False if it has none."""
        if self._replica is None:
            return False
        import ray
        from ray.exceptions import RayError

        try:
            self._load(*ray.get(self._replica.export.remote()))
        except RayError as exc:  # the replica died too, or restarted blank
            log.error("shard %d restarted and its replica has no state (%s)", self.shard_id, type(exc).__name__)
            return False
        self._restored_from = "replica"
        log.warning("shard %d restarted from its replica: nothing was lost", self.shard_id)
        return True

    def _recover(self, checkpoint_dir: str | None, num_shards: int, block_bytes: int, store: str | None = None) -> None:
        """Reload this shard's segments, optimizer state and dedupe record from the latest checkpoint.

        Only a checkpoint written by this store (``store``: its id) with the
        same layout is used; else the shard stays lost, saying why.
        """
        manifest, why = None, f"there is no checkpoint in {checkpoint_dir}"
        try:
            if checkpoint_dir is not None and checkpoint.latest(checkpoint_dir) is not None:
                manifest, params, state, tables = checkpoint.read(checkpoint_dir)
        except (OSError, ValueError) as exc:
            why = f"its checkpoint is unreadable: {exc}"
        if manifest is not None and store is not None and manifest.get("store") != store:
            manifest, why = None, f"the checkpoint in {checkpoint_dir} was written by another store"
        if manifest is not None and (manifest["num_shards"], manifest["block_bytes"]) != (num_shards, block_bytes):
            manifest, why = None, f"the checkpoint in {checkpoint_dir} has another layout"
        if manifest is None:
            self._lost_because = why
            log.error("shard %d restarted and cannot recover: %s", self.shard_id, why)
            return
        layout = Layout(HashPartitioner(num_shards, block_bytes=block_bytes))
        for key in manifest["keys"]:
            layout.add(key["name"], tuple(key["shape"]), np.dtype(key["dtype"]))
        mine = layout.state_message(self.shard_id, params, state, {k["name"]: k["step"] for k in manifest["keys"]})
        meta = manifest.get("shards", [{}] * num_shards)[self.shard_id]
        self._load(mine, {"version": meta.get("version", 0), "applied": meta.get("applied", {})},
                   _tables_of_shard(manifest["tables"], tables, self.shard_id, num_shards))
        self._restored_step = manifest["step"]
        self._restored_from = "checkpoint"
        self._replica_in_sync = False  # the replica (if any) has other state: the next change sends it this
        log.warning("shard %d restarted from the checkpoint at step %d", self.shard_id, self._restored_step)

    def _check_alive(self) -> None:
        if self._restarted and self._restored_from is None:
            raise ShardUnavailableError(f"shard {self.shard_id} restarted and its parameters are lost: "
                                        f"{self._lost_because}")
        if self._blank:
            raise ShardUnavailableError(f"replica of shard {self.shard_id} restarted and has no state yet")

    def _load(self, groups: dict, meta: dict, tables: dict | None = None) -> None:
        """Replace everything held by ``groups``, ``meta`` and ``tables`` (as :meth:`export` gives them)."""
        self._groups, self._tables, self._table_specs = {}, {}, {}
        self._register({dt: (held.keys, held.sizes, held.params) for dt, held in groups.items()})
        self._load_state({dt: (held.state, held.steps) for dt, held in groups.items()})
        for name, held in (tables or {}).items():
            self._register_table(held["spec"])
            self._tables[name].load(held["rows"])
        self._version = int(meta["version"])
        self._applied = AppliedRecord.from_json(meta["applied"])

    def register(self, message: dict) -> None:
        """Append new segments: ``{dtype: (keys, sizes, data)}``. Raises ``ValueError``.

        Idempotent: a message whose keys this shard already holds (a call
        re-sent after a restart from the replica) changes nothing.
        """
        self._check_alive()
        if self._register(message):
            self._mirror("register", message)

    def _register(self, message: dict) -> bool:
        """:meth:`register` without the checks and mirroring; False if nothing was new."""
        held = {key for group in self._groups.values() for key in group.keys}
        names = [key for keys, _, _ in message.values() for key in keys]
        if names and held.issuperset(names):
            return False
        if held.intersection(names):
            raise ValueError(f"shard {self.shard_id}: keys {sorted(held.intersection(names))[:5]} already registered")
        arrays = {dtype: from_wire(data, np.dtype(dtype)) for dtype, (_, _, data) in message.items()}
        for dtype, (keys, sizes, _) in message.items():
            if len(keys) != len(sizes) or int(np.sum(sizes)) != arrays[dtype].size:
                raise ValueError(f"shard {self.shard_id}: register sizes do not match data for {keys}")
        for dtype, (keys, sizes, _) in message.items():
            group = self._groups.setdefault(dtype, _Group(np.dtype(dtype), self._optimizer.slots()))
            group.append(list(keys), sizes, arrays[dtype])
        return True

    def push(self, packet: tuple) -> int:
        """Apply one push: ``packet = (tag, message)``; see :meth:`push_mean`.

        One argument, not two: Ray charges per argument (~0.05 ms each).
        """
        tag, message = packet
        return self.push_mean(tag, message)

    def push_mean(self, tag: tuple | None, *messages: dict) -> int:
        """Apply the mean of one or more pushes (sync mode sends W) as one update.

        ``tag``: a :class:`~shardps.store.dedup.Tag` (or the same fields as a
        tuple, or None). A push whose (client, seq) was applied before is a
        re-send and is skipped (exactly once, see :mod:`shardps.store.dedup`).
        A message may also come as an ObjectRef to one (a large push to a
        replicated shard): the ref goes on to the replica unopened, so both
        fetch the data at once.

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
        # the replica works while this shard does; a message sent as a ref travels to both at once.
        # Should it be malformed, the replica rejects it too and changes nothing.
        pending = self._mirror_send("push_mean", tuple(tag), *messages)
        fetched = _fetched(messages)
        if not fetched:
            raise ValueError("push needs at least one message")  # None messages: a sync worker with nothing here
        rows = self._plan_rows(fetched)  # validates everything before anything changes
        plan = self._plan_push([dense for dense in map(_dense_part, fetched) if dense])
        update.apply(self._optimizer, [(group, *piece) for group, _, pieces in plan for piece in pieces])
        for group, ids, _ in plan:
            group.steps[ids] += 1
        for table, ids, grads in rows:
            table.apply(ids, grads)
        return self._applied_push(tag, pending)

    def _plan_rows(self, messages: list) -> list:
        """Validate the messages' table rows and average them over all messages: ``[(table, ids, grads)]``.

        A message without rows for a table counts as zeros for it (a sync worker that did not see an id).
        Raises ``KeyError`` (unknown table) or ``ValueError`` before anything changes.
        """
        parts: dict[str, list] = {}
        for message in messages:
            for name, pair in (message or {}).get(ROWS, {}).items():
                parts.setdefault(name, []).append(pair)
        plan = []
        for name, pairs in parts.items():
            table = self._table(name)
            try:
                decoded = [(from_wire(ids, np.int64), rows_from_wire(grads, table.dtype, table.dim))
                           for ids, grads in pairs]
                if len(decoded) == 1:
                    ids, grads = decoded[0]
                else:
                    ids = np.concatenate([as_ids(ids) for ids, _ in decoded])
                    grads = np.concatenate([np.asarray(grads) for _, grads in decoded])
                ids, grads = table.checked(ids, grads)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"shard {self.shard_id}: {exc}") from None
            plan.append((table, ids, grads / len(messages) if len(messages) > 1 else grads))
        return plan

    def _applied_push(self, tag: Tag, pending) -> int:
        """Bookkeeping after a push was applied here: record it, count it, wait for the replica. Returns the version."""
        if tag.client is not None:
            self._applied.add(tag.client, tag.seq)
        if tag.base_version is not None:
            self._staleness[max(0, self._version - tag.base_version)] += 1  # < 0 only after a restore
        self._version += 1
        self._pushes += 1
        self._mirror_wait(pending)
        return self._version

    def _check_segments(self, expected: int | None) -> None:
        """Raise if this shard holds fewer segments than the client expects (``None``: not checked).

        More is fine: a Router copy made before later registrations knows fewer keys.
        """
        held = sum(len(g.sizes) for g in self._groups.values())
        if expected is None or held >= expected:
            return
        if self._restored_from == "checkpoint":
            raise ShardUnavailableError(
                f"shard {self.shard_id} restarted from the checkpoint at step {self._restored_step}, which lacks "
                f"{expected - held} of its key segments (registered after that save): their parameters are lost")
        raise ValueError(f"shard {self.shard_id} holds {held} key segments but the router expects {expected}: "
                         "was a key registered by another store or a Router copy?")

    def push_mean_refs(self, tag: tuple | None, refs: list) -> int:
        """:meth:`push_mean` of messages given as ObjectRefs, fetched here (inside a list Ray does not resolve them).

        Sync training on replicated shards: the refs go on to the replica
        unopened, so shard and replica fetch the workers' gradients at once.
        """
        return self.push_mean(tag, *refs)

    def _plan_push(self, messages) -> list:
        """Validate every message: ``[(group, ids, pieces)]``.

        ``pieces``: ``(buffer start, buffer stop, gradient, optimizer step)``;
        with several messages (sync mode) the gradient is the tuple of theirs,
        averaged while it is applied (see :mod:`shardps.store.update`). A message's
        data is one array for all its segments, or one array per segment
        (large pushes: the router then skips its packing copy).
        """
        plan = []
        for dtype, (ids, _) in (messages[0].items() if messages else ()):
            group = self._groups.get(dtype)
            if group is None:
                raise ValueError(f"shard {self.shard_id} holds no {dtype} parameters")
            ids = group.check_ids(ids)
            datas = [self._decode(group, ids, msg.get(dtype)) for msg in messages]
            if all(len(data) == 1 for data in datas):  # one array per message: contiguous runs
                pieces = [(lo, hi, _gradient([data[0][at:at + hi - lo] for data in datas]),
                           int(group.steps[run[0]])) for run, lo, hi, at in group.runs(ids, by_step=True)]
            else:  # one array per segment (in some message)
                sizes = group.sizes[ids].tolist()
                by_segment = [data if len(data) == len(ids) else split(data[0], group.dtype, sizes) for data in datas]
                pieces = [(int(group.offsets[i]), int(group.offsets[i] + group.sizes[i]), _gradient(list(parts)),
                           int(group.steps[i])) for i, *parts in zip(ids, *by_segment)]
            plan.append((group, ids, pieces))
        return plan

    def _decode(self, group: _Group, ids: np.ndarray, entry) -> list[np.ndarray]:
        """One message's data for ``ids`` as a list of 1-D arrays; raises ``ValueError`` if it does not fit."""
        other_ids, data = entry if entry is not None else (None, None)
        parts = [] if data is None else [from_wire(d, group.dtype) for d in (data if isinstance(data, list) else [data])]
        sizes = group.sizes[ids]
        fits = (len(parts) == 1 and parts[0].size == sizes.sum()) or \
            (len(parts) == len(ids) and all(p.size == n for p, n in zip(parts, sizes)))
        if not fits or not np.array_equal(group.check_ids(other_ids), ids):
            raise ValueError(f"shard {self.shard_id}: push message does not match its {group.dtype} segments")
        return parts

    # ---- embedding tables ------------------------------------------------
    def register_table(self, spec: dict) -> None:
        """Hold rows of a new table: ``spec`` = ``{"name", "dim", "dtype", "initializer", "optimizer"
        (configs), "seed", "min_count", "max_rows" (this shard's cap or None)}``. Raises ``ValueError``.

        Idempotent: the same spec again (a re-sent call) changes nothing; another spec for the name is refused.
        """
        self._check_alive()
        if self._register_table(spec):
            self._mirror("register_table", spec)

    def _register_table(self, spec: dict) -> bool:
        name = spec["name"]
        if name in self._table_specs:
            if self._table_specs[name] != spec:
                raise ValueError(f"shard {self.shard_id}: table {name!r} is already registered differently")
            return False
        self._tables[name] = EmbeddingTable(
            name, spec["dim"], dtype=np.dtype(spec["dtype"]), initializer=initializer_from_config(spec["initializer"]),
            optimizer=optimizer_from_config(spec["optimizer"]), seed=spec["seed"], min_count=spec["min_count"],
            max_rows=spec["max_rows"])
        self._table_specs[name] = dict(spec)
        return True

    def _table(self, name: str) -> EmbeddingTable:
        table = self._tables.get(name)
        if table is not None:
            return table
        if self._restored_from == "checkpoint":
            raise ShardUnavailableError(f"shard {self.shard_id} restarted from the checkpoint at step "
                                        f"{self._restored_step}, which lacks table {name!r}: its rows are lost")
        raise KeyError(f"shard {self.shard_id} holds no table {name!r}")

    def load_table(self, name: str, rows: dict) -> None:
        """Replace table ``name``'s rows here (restore); see :meth:`EmbeddingTable.load`. Raises ``ValueError``."""
        self._check_alive()
        self._table(name).load(rows)
        self._mirror("load_table", name, rows)

    def pull(self, packet: tuple = (None, None)) -> tuple[int, dict]:
        """Current values: ``packet = (segments, request)`` -> ``(version, {dtype: data})``.

        ``request``: ``{dtype: segment ids or None}``, ``None`` for everything;
        ``segments``: what the client expects this shard to hold (see :meth:`push_mean`).
        """
        self._check_alive()
        expected, request = packet
        self._check_segments(expected)
        if request is None:
            request = dict.fromkeys(self._groups)
        out = {}
        if ROWS in request:
            out[ROWS] = {name: to_wire(self._table(name).pull(from_wire(ids, np.int64)))
                         for name, ids in request[ROWS].items()}
        for dtype, ids in request.items():
            if dtype == ROWS:
                continue
            out[dtype] = _answer(self._groups[dtype], ids)
        self._pulls += 1
        return self._version, out

    def push_pull(self, packet: tuple) -> tuple[int, dict]:
        """``packet = (tag, message, request)``: push ``message`` (if any), then pull ``request`` (if any)."""
        tag, message, request = packet
        if message is not None:
            self.push_mean(tag, message)
        segments = Tag(*tag).segments if tag else None
        return self.pull((segments, request)) if request is not None else (self._version, {})

    def export(self) -> tuple[dict, dict]:
        """Everything this shard holds: ``({dtype: SegmentState}, meta, tables)``.

        ``tables``: ``{name: {"spec": what register_table got, "rows": EmbeddingTable.export()}}``.

        The format of :meth:`Layout.state_message`. ``meta`` is ``{"version",
        "applied"}`` (the :class:`~shardps.store.dedup.AppliedRecord` as JSON), so
        a restarted shard keeps skipping pushes it had already applied.
        """
        self._check_alive()
        groups = {dt: SegmentState(list(g.keys), g.sizes, g.params, g.state, g.steps)
                  for dt, g in self._groups.items()}
        tables = {name: {"spec": self._table_specs[name], "rows": table.export()}
                  for name, table in self._tables.items()}
        return groups, {"version": self._version, "applied": self._applied.to_json()}, tables

    # ---- replication ---------------------------------------------------
    _MIRRORED = ("register", "push_mean", "load_state", "register_table", "load_table")

    def replicate(self, method: str, args: tuple) -> bool:
        """On a replica: apply a change its shard just made. False if this replica restarted and needs :meth:`adopt`."""
        if method not in self._MIRRORED:
            raise ValueError(f"cannot replicate {method!r}")
        if self._blank:
            return False
        getattr(self, method)(*args)
        return True

    def adopt(self, groups: dict, meta: dict, tables: dict | None = None) -> None:
        """On a replica: replace everything with its shard's :meth:`export`."""
        self._blank = False
        self._load(groups, meta, tables)

    def _mirror(self, method: str, *args) -> None:
        """Apply the change just made here on the replica too; blocks until it has."""
        self._mirror_wait(self._mirror_send(method, *args))

    def _mirror_send(self, method: str, *args):
        """Start the same change on the replica (it applies changes in the order sent); see :meth:`_mirror_wait`."""
        if self._replica is None or not self._replica_in_sync:
            return None
        return self._replica.replicate.remote(method, args)

    def _mirror_wait(self, pending) -> None:
        """Block until the replica applied ``pending``.

        Call it after the change was made here too: a replica that failed,
        or restarted blank, is sent this shard's whole state instead; one
        that does not come back is dropped (logged).
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
            ray.get(self._replica.adopt.remote(*self.export()))
            self._resyncs += 1
            self._replica_in_sync = True
        except (RayError, ShardUnavailableError) as exc:
            log.error("shard %d lost its replica for good (%s): running without one", self.shard_id, exc)
            self._replica, self._replica_state = None, "lost"

    def load_state(self, message: dict) -> None:
        """Replace optimizer state: ``{dtype: ({slot: data}, steps per segment)}``.

        Raises ``ValueError`` (before changing anything) when a dtype, slot or size does not match.
        """
        self._check_alive()
        self._load_state(message)
        self._mirror("load_state", message)

    def _load_state(self, message: dict) -> None:
        for dtype, (state, steps) in message.items():
            group = self._groups.get(dtype)
            if group is None or set(state) != set(group.state) or len(steps) != len(group.steps) \
                    or any(np.size(data) != len(group.params) for data in state.values()):
                raise ValueError(f"shard {self.shard_id}: optimizer state does not match the {dtype} buffer")
        for dtype, (state, steps) in message.items():
            group = self._groups[dtype]
            for name, data in state.items():
                group.state[name][:] = data
            group.steps[:] = steps

    def stats(self) -> dict:
        """Counters: keys, segments, bytes, pushes, pulls, version, staleness; where it runs; recoveries.

        ``restored_from``: ``"replica"`` (nothing lost) or ``"checkpoint"``
        (pushes after ``restored_step`` lost) after a restart. ``replica``:
        ``"ok"``, ``"lost"`` or None (no replica).
        """
        return {
            "shard": self.shard_id,
            "keys": int(sum(len(g.keys) for g in self._groups.values())),
            "segments": int(sum(len(g.sizes) for g in self._groups.values())),
            "bytes": int(sum(g.params.nbytes for g in self._groups.values())),
            "tables": {name: {"rows": len(table), "bytes": table.nbytes} for name, table in self._tables.items()},
            "pushes": self._pushes,
            "pulls": self._pulls,
            "version": self._version,
            "staleness": dict(self._staleness),
            "pid": os.getpid(),
            "node": _node_id(),
            "restarted": self._restarted,
            "restored_from": self._restored_from,
            "restored_step": self._restored_step,
            "replica": self._replica_state,
            "resyncs": self._resyncs,
        }

    def ping(self) -> None:
        """Do nothing (liveness checks; Ray's round-trip floor in benchmarks)."""

    def ping_back(self, payload):
        """Return ``payload`` (Ray's floor for a call that carries data both ways)."""
        return payload
