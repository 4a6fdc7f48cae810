"""A shard's embedding tables: each table's rows, per-row optimizer, admission and eviction.

Plain classes (no Ray): :class:`EmbeddingTable` holds one table's rows on one
shard, :class:`RowStore` every table of the shard.

Rows live in arrays that grow by doubling (parameters, one array per
optimizer slot, and per row its update count and the logical time of its
last update); :class:`~shardps.store.shard.index.RowIndex` maps ids to rows. A batch
costs a few vectorised passes: look the ids up, create the admitted new
rows from their deterministic initial values, gather, apply the optimizer to
the gathered rows, scatter back.

Semantics (TFRA / Monolith): a pull never creates a row and answers an id
without one with its initial value; a push creates the rows of admitted ids.
Admission (``min_count=k``): an id gets a row once it has appeared in k
pushes; until then its gradients are dropped. The counts live in a fixed
array of ``count_slots`` saturating 8-bit counters indexed by a hash of the
id (bounded memory, 1 MiB by default; two ids sharing a counter are
admitted early, never late). Eviction (``max_rows``): when a push would
exceed it, the least recently updated rows that the push does not touch go,
with their optimizer state; an evicted id comes back at its initial value.
"""
from __future__ import annotations

import logging

import numpy as np

from shardps.store.errors import ShardUnavailableError
from shardps.store.ids import as_ids, mix64, name_salt, segment_sum, unique
from shardps.store.shard.index import RowIndex
from shardps.store.tables import COUNT_SLOTS, TableSpec
from shardps.store.wire import all_finite, from_wire, rows_from_wire, to_wire

_COUNTER_SALT = 0xC0FFEE  # admission counters hash ids apart from placement and the row index
_CHUNK_IDS = 1 << 16  # ids per step of a large pull: its temporaries stay small beside the answer
log = logging.getLogger(__name__)


class EmbeddingTable:
    """Rows of table ``name`` held by one shard.

    Args:
        name, dim, dtype: the table.
        initializer: :class:`~shardps.store.initializers.Zeros`, ``Uniform`` or ``Normal``.
        optimizer: a :mod:`shardps.store.optim` rule (``SGD``, ``Adagrad``, ``Adam`` -- lazy, one step count
            per row -- or ``FTRL``); ``Momentum`` is refused (its decay would need every row every step).
        seed: the initializer's seed.
        min_count: pushes an id must appear in before it gets a row (1: at once).
        max_rows: rows this shard keeps at most (None: no limit).
        count_slots: admission counters (a power of two).
    """

    def __init__(self, name: str, dim: int, *, initializer, optimizer, dtype=np.float32, seed: int = 0,
                 min_count: int = 1, max_rows: int | None = None, count_slots: int = COUNT_SLOTS):
        TableSpec(name, dim, initializer, optimizer, dtype, seed, min_count, max_rows)  # checks every argument
        self.name, self.dim, self.dtype = name, dim, np.dtype(dtype)
        self.initializer, self.optimizer, self.seed = initializer, optimizer, seed
        self.min_count, self.max_rows = min_count, max_rows
        self._index = RowIndex()
        self._params = np.empty((0, dim), self.dtype)
        self._state = {slot: np.empty((0, dim), self.dtype) for slot in optimizer.slots()}
        self._steps = np.empty(0, np.int32)  # updates per row (lazy Adam's t)
        self._touched = np.empty(0, np.int32)  # logical time of each row's last update (eviction order)
        self._clock = 0
        self._counts = np.zeros(count_slots if min_count > 1 else 0, np.uint8)
        self._salt = name_salt(name, seed)

    def __len__(self) -> int:
        return len(self._index)

    def export(self) -> dict[str, np.ndarray]:
        """Every row, ids ascending: ``ids``, ``params``, ``slot.<name>``, ``steps``, ``touched``; plus
        ``counts`` (admission counters). What :meth:`load` takes."""
        ids, slots = self._index.items()
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        return {"ids": ids, "params": self._params[slots], "steps": self._steps[slots].astype(np.int64),
                "touched": self._touched[slots].astype(np.int64), "counts": self._counts.copy(),
                **{f"slot.{name}": buf[slots] for name, buf in self._state.items()}}

    def load(self, rows: dict) -> None:
        """Replace every row with ``rows`` (as :meth:`export` gives them, or a shard's share of them).

        Raises ``ValueError`` (before changing anything) when shapes or slots do not fit this table.
        """
        ids = as_ids(rows["ids"])
        n, slots = len(ids), {k[5:] for k in rows if k.startswith("slot.")}
        if slots != set(self._state) or any(np.shape(rows[k]) != (n, self.dim) for k in rows
                                            if k == "params" or k.startswith("slot.")) \
                or np.shape(rows["steps"]) != (n,) or np.shape(rows["touched"]) != (n,) \
                or np.shape(rows["counts"]) != self._counts.shape or len(unique(ids)) != n:
            raise ValueError(f"table {self.name!r}: saved rows do not fit (dim {self.dim}, slots {sorted(self._state)})")
        if self.max_rows is not None and n > self.max_rows:  # restored into more shards: each holds less
            log.warning("table %r: %d saved rows for a cap of %d on this shard: keeping the most recently "
                        "updated", self.name, n, self.max_rows)
            keep = np.sort(np.argsort(np.asarray(rows["touched"]), kind="stable")[n - self.max_rows:])
            rows = {k: (v if k == "counts" else np.asarray(v)[keep]) for k, v in rows.items()}
            ids, n = ids[keep], self.max_rows
        self._index = RowIndex()
        self._params = np.empty((0, self.dim), self.dtype)
        self._state = {name: np.empty((0, self.dim), self.dtype) for name in self._state}
        self._steps, self._touched = np.empty(0, np.int32), np.empty(0, np.int32)
        at = self._index.insert(ids)
        self._grow(n)
        self._params[at] = rows["params"]
        for name, buf in self._state.items():
            buf[at] = rows[f"slot.{name}"]
        times, order = np.unique(np.asarray(rows["touched"]), return_inverse=True)  # dense, same order: fits int32
        self._steps[at] = np.minimum(rows["steps"], np.iinfo(np.int32).max)
        self._touched[at] = order
        self._counts[:] = rows["counts"]
        self._clock = len(times)

    @property
    def nbytes(self) -> int:
        """Bytes in use: rows, optimizer slots and per-row counters of every slot handed out so far,
        the index and the admission counters (the row arrays' never-written tail is not counted:
        see :meth:`_grow`)."""
        per_row = self.dim * self.dtype.itemsize * (1 + len(self._state)) + self._steps.itemsize + self._touched.itemsize
        return self._index.slots_used * per_row + self._index.nbytes + self._counts.nbytes

    def pull(self, ids) -> np.ndarray:
        """``(len(ids), dim)`` rows; ids without a row get their initial value. Creates nothing.

        Works through the ids in chunks, so the temporaries of a large pull
        (lookups, initial values) stay small beside the answer.
        """
        ids = as_ids(ids)
        out = np.empty((len(ids), self.dim), self.dtype)
        for at in range(0, len(ids), _CHUNK_IDS):
            chunk, part = ids[at:at + _CHUNK_IDS], out[at:at + _CHUNK_IDS]
            slots = self._index.lookup(chunk)
            have = slots >= 0
            if have.any():
                np.take(self._params, np.where(have, slots, 0), axis=0, out=part)
            if not have.all():
                part[~have] = self._initial(chunk[~have])
        return out

    def _initial(self, ids: np.ndarray) -> np.ndarray:
        """The initial rows of ``ids``."""
        return self.initializer.rows(ids, self.dim, name=self.name, seed=self.seed, dtype=self.dtype)

    def push(self, ids, grads) -> None:
        """Apply one update: duplicate ids' gradients are summed, then applied once per row.

        Raises ``ValueError`` (wrong shape, NaN/Inf) before anything changes.
        """
        self.apply(*self.checked(ids, grads))

    def checked(self, ids, grads) -> tuple[np.ndarray, np.ndarray]:
        """``(unique ids ascending, summed grads)`` ready for :meth:`apply`; changes nothing.

        Raises ``ValueError`` for bad ids, grads of the wrong shape or NaN/Inf.
        """
        grads = np.asarray(grads, self.dtype)
        if grads.shape != (len(np.asarray(ids)), self.dim):
            raise ValueError(f"table {self.name!r}: grads must have shape ({len(np.asarray(ids))}, {self.dim}). "
                             f"Received {grads.shape}")
        if not all_finite(grads):
            raise ValueError(f"table {self.name!r}: grads contain NaN or Inf")
        return segment_sum(ids, grads)

    def apply(self, ids: np.ndarray, grads: np.ndarray) -> None:
        """Apply what :meth:`checked` returned (unique ids, finite grads of the right shape)."""
        slots = self._index.lookup(ids)
        new = slots < 0
        if new.any():  # (the filters below copy only when they drop something)
            admitted = ~new | self._admit(ids[new], slots)
            if not admitted.all():
                ids, grads, slots, new = ids[admitted], grads[admitted], slots[admitted], new[admitted]
            slots[new] = self._create(ids[new], keep=slots[~new])
            kept = slots >= 0  # rows the eviction bound had no room for are dropped
            if not kept.all():
                ids, grads, slots = ids[kept], grads[kept], slots[kept]
        params = np.take(self._params, slots, axis=0)
        state = {name: np.take(buf, slots, axis=0) for name, buf in self._state.items()}
        self.optimizer.apply(params, grads, state, self._steps[slots][:, None])
        self._params[slots] = params
        for name, buf in self._state.items():
            buf[slots] = state[name]
        self._steps[slots] += 1
        self._touched[slots] = self._clock
        self._clock += 1
        if self._clock == np.iinfo(np.int32).max:  # renumber the update times densely, keeping their order
            times, self._touched[:] = np.unique(self._touched, return_inverse=True)
            self._clock = len(times)

    def _admit(self, unseen: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Count this push for ids without a row; True where an id reached ``min_count`` (shaped like ``slots``)."""
        out = np.zeros(len(slots), bool)
        if self.min_count == 1:
            out[slots < 0] = True
            return out
        cells = (mix64(unseen.view(np.uint64) ^ self._salt ^ np.uint64(_COUNTER_SALT))
                 & np.uint64(len(self._counts) - 1)).astype(np.int64)
        shared, times = np.unique(cells, return_counts=True)  # ids sharing a cell count for each other
        self._counts[shared] = np.minimum(255, self._counts[shared].astype(np.int64) + times)
        out[slots < 0] = self._counts[cells] >= self.min_count
        return out

    def _create(self, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Rows for new ``ids`` at their initial values, evicting old rows (never ``keep``) past ``max_rows``.

        Returns their slots; -1 for ids there was no room for.
        """
        room = len(ids)
        if self.max_rows is not None:
            over = len(self) + len(ids) - self.max_rows
            if over > 0:
                self._evict(over, keep)
            room = min(len(ids), self.max_rows - len(self))
        created = np.full(len(ids), -1, np.int64)
        slots = self._index.insert(ids[:room], checked=True)  # push() looked them up: absent, unique
        self._grow(int(slots.max()) + 1 if room else 0)
        for at in range(0, room, _CHUNK_IDS):
            self._params[slots[at:at + _CHUNK_IDS]] = self._initial(ids[at:min(room, at + _CHUNK_IDS)])
        for buf in self._state.values():
            buf[slots] = 0
        self._steps[slots] = 0
        created[:room] = slots
        return created

    def _evict(self, count: int, keep: np.ndarray) -> None:
        """Remove the ``count`` least recently updated rows outside ``keep`` (fewer if there are not so many)."""
        ids, slots = self._index.items()
        candidates = ~np.isin(slots, keep)
        ids, slots = ids[candidates], slots[candidates]
        if len(slots) > count:
            oldest = np.argpartition(self._touched[slots], count - 1)[:count]
            ids = ids[oldest]
        self._index.remove(ids)

    def _grow(self, rows: int) -> None:
        """Room for ``rows`` rows: every per-row array doubles (at least) into a new zeroed array.

        The new arrays come from ``np.zeros`` (``calloc``): their unused tail is address space the
        kernel backs with memory only when a row is first written, so doubling costs copies
        (amortised O(1) per row), not resident memory.
        """
        if rows <= len(self._params):
            return
        capacity = max(rows, 2 * len(self._params), 16)
        self._params = _grown(self._params, capacity)
        self._state = {name: _grown(buf, capacity) for name, buf in self._state.items()}
        self._steps, self._touched = _grown(self._steps, capacity), _grown(self._touched, capacity)


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + a.shape[1:], a.dtype)
    out[:len(a)] = a
    return out


class RowStore:
    """Every table of one shard, by name. ``lost``: why tables may be missing (a restart from an older
    checkpoint); set, an unknown table raises ``ShardUnavailableError`` instead of ``KeyError``."""

    def __init__(self):
        self._tables: dict[str, EmbeddingTable] = {}
        self._specs: dict[str, dict] = {}  # what register received, by table name
        self.lost: str | None = None

    def register(self, spec: dict) -> bool:
        """Hold a new table: ``spec`` is :meth:`TableSpec.for_shard`'s. False if it is held already (a re-send).

        Raises ``ValueError`` for a bad spec, or another spec under a name already held.
        """
        name = spec.get("name") if isinstance(spec, dict) else None
        if name in self._specs:
            if self._specs[name] != spec:
                raise ValueError(f"table {name!r} is already registered differently")
            return False
        checked = TableSpec.from_json(spec)
        self._tables[name] = EmbeddingTable(
            name, checked.dim, dtype=checked.dtype, initializer=checked.initializer, optimizer=checked.optimizer,
            seed=checked.seed, min_count=checked.min_count, max_rows=checked.max_rows)
        self._specs[name] = dict(spec)
        return True

    def table(self, name: str) -> EmbeddingTable:
        """The table ``name``. Raises ``KeyError`` (or ``ShardUnavailableError``, see :attr:`lost`)."""
        table = self._tables.get(name) if isinstance(name, str) else None
        if table is not None:
            return table
        if self.lost is not None:
            raise ShardUnavailableError(f"{self.lost}, which lacks table {name!r}: its rows are lost")
        raise KeyError(f"holds no table {name!r}")

    def plan(self, parts: list[dict], count: int) -> list:
        """Validate the row parts ``{table: (ids, grads)}`` of ``count`` messages and average them over all
        of them: ``[(table, unique ids, grads)]``. A message without rows for a table counts as zeros for it
        (a sync worker that did not see an id). Raises ``KeyError``/``ValueError`` before anything changes.
        """
        by_table: dict[str, list] = {}
        for rows in parts:
            for name, pair in rows.items():
                by_table.setdefault(name, []).append(pair)
        plan = []
        for name, pairs in by_table.items():
            table = self.table(name)
            try:
                decoded = [(from_wire(ids, np.int64), rows_from_wire(grads, table.dtype, table.dim))
                           for ids, grads in pairs]
                ids = np.concatenate([as_ids(ids) for ids, _ in decoded]) if len(decoded) > 1 else decoded[0][0]
                grads = np.concatenate([np.asarray(g) for _, g in decoded]) if len(decoded) > 1 else decoded[0][1]
                ids, grads = table.checked(ids, grads)
            except (TypeError, ValueError) as exc:
                raise ValueError(str(exc)) from None
            plan.append((table, ids, grads / count if count > 1 else grads))
        return plan

    @staticmethod
    def apply(plan: list) -> None:
        """Apply a :meth:`plan`."""
        for table, ids, grads in plan:
            table.apply(ids, grads)

    def answer(self, request: dict) -> dict:
        """Rows asked for: ``{table: ids}`` -> ``{table: rows}`` (wire form). Creates nothing."""
        return {name: to_wire(self.table(name).pull(from_wire(ids, np.int64))) for name, ids in request.items()}

    def load_rows(self, name: str, rows: dict) -> None:
        """Replace table ``name``'s rows (restore); see :meth:`EmbeddingTable.load`. Raises ``ValueError``."""
        self.table(name).load(rows)

    def stats(self) -> dict:
        return {name: {"rows": len(table), "bytes": table.nbytes} for name, table in self._tables.items()}

    def export(self) -> dict:
        """``{name: {"spec": what register got, "rows": EmbeddingTable.export()}}``: what :meth:`load` takes."""
        return {name: {"spec": self._specs[name], "rows": table.export()} for name, table in self._tables.items()}

    def load(self, tables: dict) -> None:
        """Replace every table with ``tables`` (as :meth:`export` gives them)."""
        self._tables, self._specs = {}, {}
        for name, held in tables.items():
            self.register(held["spec"])
            self._tables[name].load(held["rows"])
