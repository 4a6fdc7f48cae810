"""Building blocks of embedding tables (rows addressed by int64 ids), in vectorised numpy.

Not wired into the Router and the shards yet (see the sparse-tables issue):
this module holds the pieces that must be right first, each a pure function
or a plain class tested against a dict oracle.

- :func:`mix64` / :func:`shard_of_ids`: where a row lives. One SplitMix64
  finaliser per id, vectorised (xxhash's Python API costs a call per id,
  ~0.3 us each: 1 ms per 4096-id batch; this is ~20 ns per id). Placement is
  a pure function of (id, table name, shard count).
- :class:`Zeros`, :class:`Uniform`, :class:`Normal`: a row's initial value is
  a pure function of (table seed, table name, id) -- counter-based, so it
  does not depend on the shard count, the arrival order or an earlier
  eviction.
- :func:`segment_sum`: a batch's unique ids and their summed gradients
  (sort, then a sparse 0/1 matrix product; ``a[[0, 0]] += g`` would apply
  once, ``np.add.at`` is slow).
- :class:`RowIndex`: id -> row slot, open addressing with linear probing in
  numpy arrays; a batch's lookup or insert is a few vectorised passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash
from scipy.sparse import csr_array

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def as_ids(ids) -> np.ndarray:
    """``ids`` as a 1-D int64 array. Raises ``TypeError`` (not integers) or ``ValueError`` (shape, range).

    int64 and smaller integers are widened; uint64 is accepted below 2**63.
    """
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"ids must be integers. Received dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D. Received shape {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must be below 2**63 (int64)")
    return arr.astype(np.int64, copy=False)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, element-wise on uint64 (wrapping arithmetic): a fast, well-mixed 64-bit hash."""
    x = np.asarray(x, np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def name_salt(name: str, seed: int = 0) -> np.uint64:
    """A table's 64-bit salt: its rows hash differently from another table's."""
    return np.uint64(xxhash.xxh64_intdigest(name.encode("utf-8"), seed=seed))


def shard_of_ids(ids: np.ndarray, name: str, num_shards: int) -> np.ndarray:
    """The shard of each id of table ``name``: ``mix64(id ^ salt) % num_shards`` (int64 array)."""
    return (mix64(as_ids(ids).view(np.uint64) ^ name_salt(name)) % np.uint64(num_shards)).astype(np.int64)


def rows_per_shard(max_rows: int | None, num_shards: int) -> int | None:
    """Each shard's share of a table's ``max_rows``: ceil(max_rows / num_shards) (None: no limit)."""
    return None if max_rows is None else -(-max_rows // num_shards)


def _uniform01(ids: np.ndarray, salt: np.uint64, columns: int, stream: int = 0) -> np.ndarray:
    """Counter-based uniforms in [0, 1): one per (id, column), a pure function of (salt, id, column, stream)."""
    base = mix64(ids.view(np.uint64) ^ salt)[:, None]
    counters = (np.arange(columns, dtype=np.uint64) * np.uint64(2) + np.uint64(stream)) * _GOLDEN
    bits = mix64(base ^ counters[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass(frozen=True)
class Zeros:
    """Every new row starts at 0."""

    def rows(self, ids: np.ndarray, dim: int, *, name: str, seed: int, dtype=np.float32) -> np.ndarray:
        return np.zeros((len(ids), dim), dtype)


@dataclass(frozen=True)
class Uniform:
    """New rows uniform in [low, high), a pure function of (seed, table name, id)."""

    low: float = -0.05
    high: float = 0.05

    def __post_init__(self):
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"Uniform needs finite low < high. Received: {self.low!r}, {self.high!r}")

    def rows(self, ids: np.ndarray, dim: int, *, name: str, seed: int, dtype=np.float32) -> np.ndarray:
        u = _uniform01(as_ids(ids), name_salt(name, seed), dim)
        return (self.low + (self.high - self.low) * u).astype(dtype)


@dataclass(frozen=True)
class Normal:
    """New rows normal with mean 0 and ``std`` (Box-Muller on counter-based uniforms)."""

    std: float = 0.01

    def __post_init__(self):
        if not (np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"Normal needs a positive finite std. Received: {self.std!r}")

    def rows(self, ids: np.ndarray, dim: int, *, name: str, seed: int, dtype=np.float32) -> np.ndarray:
        ids, salt = as_ids(ids), name_salt(name, seed)
        u1 = 1.0 - _uniform01(ids, salt, dim, stream=0)  # (0, 1]: log is finite
        u2 = _uniform01(ids, salt, dim, stream=1)
        return (self.std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(dtype)


INITIALIZERS = {"zeros": Zeros, "uniform": Uniform, "normal": Normal}


def initializer_config(init) -> dict:
    """JSON-safe ``{"name": ..., **arguments}`` of an initializer; raises ``ValueError`` for anything else."""
    for name, cls in INITIALIZERS.items():
        if type(init) is cls:
            return {"name": name, **{k: getattr(init, k) for k in cls.__dataclass_fields__}}
    raise ValueError(f"Argument `initializer` must be shardps.Zeros(), Uniform(a, b) or Normal(std). "
                     f"Received: {init!r}")


def initializer_from_config(config: dict):
    """Inverse of :func:`initializer_config`. Raises ``ValueError``."""
    config = dict(config)
    cls = INITIALIZERS.get(config.pop("name", None))
    if cls is None:
        raise ValueError(f"unknown initializer {config!r}; expected one of {sorted(INITIALIZERS)}")
    try:
        return cls(**config)
    except TypeError as exc:
        raise ValueError(f"initializer arguments {config!r}: {exc}") from None


def segment_sum(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(unique ids ascending, summed rows)``: rows of equal ids added up (sort-based, vectorised).

    Ids already strictly ascending (what a shard receives from a Router) come back as they are.
    """
    ids = as_ids(ids)
    grads = np.asarray(grads)
    if grads.ndim != 2 or len(grads) != len(ids):
        raise ValueError(f"grads must have shape ({len(ids)}, dim). Received {grads.shape}")
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():
        return ids, grads
    order = np.argsort(ids)  # equal ids may come in any order: their sum is the same up to rounding
    ordered = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    if grads.dtype not in (np.float32, np.float64):
        return ordered[starts], np.add.reduceat(np.take(grads, order, axis=0), starts, axis=0)
    # a 0/1 matrix (unique ids x rows) times the gradients: scipy's sparse product is 3-6x faster than
    # np.add.reduceat over rows of 16-64 values
    summing = csr_array((np.ones(len(ids), grads.dtype), order, np.append(starts, len(ids))),
                        shape=(len(starts), len(ids)))
    return ordered[starts], summing @ grads


_FREE, _GONE = -1, -2  # slot values of empty cells; GONE (a tombstone) keeps probe chains intact after a removal
_MAX_LOAD, _TARGET_LOAD = 0.8, 0.6  # the index grows when 80 % of its cells are taken, to 60 % taken
_WINDOW = 16  # cells of a probe chain looked at per vectorised round (chains at 80 % load run long)


class RowIndex:
    """id -> row slot, open addressing with linear probing on numpy arrays.

    Slots are handed out densely (0, 1, 2, ...) and reused after
    :meth:`remove`. Memory: 12 bytes per cell (an int64 id and an int32
    slot, whose negative values mark free cells and tombstones, so a shard
    holds at most 2**31 rows of a table); the index grows when 80 % of its
    cells are taken, to 60 % taken: 15-20 bytes per row. Probing is
    vectorised: a first numpy round looks at every id's home cell, each
    further round at the next 16 cells of every chain still open.
    """

    def __init__(self, capacity: int = 1024):
        self._keys = np.zeros(max(16, capacity), np.int64)
        self._slots = np.full(max(16, capacity), _FREE, np.int32)
        self._live = 0
        self._gone = 0
        self._next_slot = 0
        self._free_slots: list[np.ndarray] = []

    def __len__(self) -> int:
        return self._live

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._slots.nbytes

    @property
    def slots_used(self) -> int:
        """Slots handed out so far (live rows plus freed slots waiting for reuse): the rows' high-water mark."""
        return self._next_slot

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """First cell of each id's probe chain: the top 32 bits of its hash scaled to the cell count."""
        top = mix64(ids.view(np.uint64)) >> np.uint64(32)
        return ((top * np.uint64(len(self._keys))) >> np.uint64(32)).astype(np.int64)

    def _find(self, ids: np.ndarray) -> np.ndarray:
        """Cell of each id, or -1. Probes all ids at once: their home cells first (most ids end there),
        then ``_WINDOW`` cells of each chain still open per vectorised round."""
        pos = self._home(ids)
        slot = self._slots[pos]
        hit = (slot >= 0) & (self._keys[pos] == ids)
        cells = np.where(hit, pos, -1)
        todo = np.flatnonzero(~hit & (slot != _FREE))  # a FREE cell ends the chain: not there
        pos = (pos[todo] + 1) % len(self._keys)  # aligned with todo from here on
        while todo.size:
            window = self._window(pos, _WINDOW)
            slot = self._slots[window]
            hit = (slot >= 0) & (self._keys[window] == ids[todo, None])
            first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), _WINDOW)
            free = slot == _FREE  # a hit never lies beyond a FREE cell
            first_free = np.where(free.any(axis=1), free.argmax(axis=1), _WINDOW)
            found = first_hit < _WINDOW
            cells[todo[found]] = window[found, first_hit[found]]
            going = ~found & (first_free == _WINDOW)
            todo, pos = todo[going], (pos[going] + _WINDOW) % len(self._keys)
        return cells

    def lookup(self, ids) -> np.ndarray:
        """The slot of each id, or -1 where it has none. Does not block, changes nothing."""
        ids = as_ids(ids)
        cells = self._find(ids)
        return np.where(cells >= 0, self._slots[np.maximum(cells, 0)], -1).astype(np.int64)

    def insert(self, ids, *, checked: bool = False) -> np.ndarray:
        """Give each id (unique, not yet present) a slot; returns the slots. Raises ``ValueError`` otherwise.

        ``checked=True``: the caller knows the ids are unique and absent (it just looked them up), so
        they are not probed twice.
        """
        ids = as_ids(ids)
        if not checked and (len(np.unique(ids)) != len(ids) or (self._find(ids) >= 0).any()):
            raise ValueError("insert needs unique ids that are not in the index yet")
        if self._live + self._gone + len(ids) > _MAX_LOAD * len(self._keys):
            self._rebuild(int((self._live + len(ids)) / _TARGET_LOAD) + 16)
        slots = self._take_slots(len(ids))
        if slots.size and slots[-1] > np.iinfo(np.int32).max:
            raise ValueError("a table holds at most 2**31 rows per shard: use more shards or max_rows")
        self._place(ids, slots)
        self._live += len(ids)
        return slots

    def remove(self, ids) -> np.ndarray:
        """Forget each id (absent ones are ignored); returns the freed slots (reused by later inserts)."""
        cells = self._find(as_ids(ids))
        cells = np.unique(cells[cells >= 0])
        freed = self._slots[cells].astype(np.int64)
        self._slots[cells] = _GONE
        self._live -= len(cells)
        self._gone += len(cells)
        if len(freed):
            self._free_slots.append(freed)
        return freed

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, slots)`` of every entry, in cell order."""
        used = self._slots >= 0
        return self._keys[used], self._slots[used].astype(np.int64)

    def _take_slots(self, n: int) -> np.ndarray:
        reuse = np.concatenate(self._free_slots) if self._free_slots else np.empty(0, np.int64)
        take, keep = reuse[:n], reuse[n:]
        self._free_slots = [keep] if len(keep) else []
        fresh = np.arange(self._next_slot, self._next_slot + n - len(take), dtype=np.int64)
        self._next_slot += len(fresh)
        return np.concatenate([take, fresh])

    def _rebuild(self, capacity: int) -> None:
        """Re-insert every live entry into a table of ``capacity`` cells (drops tombstones)."""
        ids, slots = self.items()
        self._keys = np.zeros(capacity, np.int64)
        self._slots = np.full(capacity, _FREE, np.int32)
        self._gone = 0
        self._place(ids, slots)

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Write each (id, slot) into the first cell of its probe chain that is not in use."""
        pos, todo, width = self._home(ids), np.arange(len(ids)), 1
        while todo.size:
            window = self._window(pos[todo], width)
            open_ = self._slots[window] < 0
            has = open_.any(axis=1)
            chosen = window[np.arange(len(todo)), open_.argmax(axis=1)]
            # several ids may want the same open cell this round: the first of each takes it
            cells, first = np.unique(chosen[has], return_index=True)
            won = todo[has][first]
            self._gone -= int((self._slots[cells] == _GONE).sum())  # a tombstone reused
            self._keys[cells], self._slots[cells] = ids[won], slots[won]
            # the rest go on from the cell they wanted (now in use) or, with none open, past the window
            pos[todo] = np.where(has, chosen, (pos[todo] + width) % len(self._keys))
            left = np.ones(len(todo), bool)
            left[np.searchsorted(todo, won)] = False
            todo = todo[left]
            width = _WINDOW

    def _window(self, starts: np.ndarray, width: int) -> np.ndarray:
        """``(len(starts), width)`` cells: each start and the cells after it (wrapping around)."""
        return (starts[:, None] + np.arange(width)) % len(self._keys)
