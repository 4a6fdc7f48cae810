"""RowIndex: int64 id -> row slot, open addressing with linear probing in numpy arrays.

A batch's lookup or insert is a few vectorised passes, never a Python loop over ids.
"""
from __future__ import annotations

import numpy as np

from shardps.store.ids import as_ids, mix64, unique

_FREE, _GONE = -1, -2  # slot values of empty cells; GONE (a tombstone) keeps probe chains intact after a removal
_MAX_LOAD, _TARGET_LOAD = 0.6, 0.4  # the index grows when 60 % of its cells are taken, to 40 % taken
_NARROW = 3  # rounds that look at one more cell of each chain still open (most chains are short)
_WINDOW = 16  # cells of a probe chain looked at per vectorised round after those (a few chains run long)


class RowIndex:
    """id -> row slot, open addressing with linear probing on numpy arrays.

    Slots are handed out densely (0, 1, 2, ...) and reused after
    :meth:`remove`. Memory: 12 bytes per cell (an int64 id and an int32
    slot, whose negative values mark free cells and tombstones, so a shard
    holds at most 2**31 rows of a table); the index grows when 60 % of its
    cells are taken, to 40 % taken: 20-30 bytes per row (at 80 % a lookup
    took 1.7x as long: longer probe chains). Probing is
    vectorised: a first numpy round looks at every id's home cell, three
    more at the next cell of every chain still open, and further rounds at
    the next 16 cells (a lookup of 6,000 ids in a table 57 % full: 190 us;
    with 16-cell rounds from the second on, 350 us).
    """

    def __init__(self, capacity: int = 1024):
        capacity = max(_WINDOW, capacity)  # a probe window fits in the table: see _wrap
        self._keys = np.zeros(capacity, np.int64)
        self._slots = np.full(capacity, _FREE, np.int32)
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
        """Cell of each id, or -1. Probes all ids at once: their home cells first (most ids end there), the
        next cell of each chain still open for ``_NARROW`` rounds, then ``_WINDOW`` cells per round (a few
        chains run long: one cell per round would take many rounds, a window for every chain many cells)."""
        pos = self._home(ids)
        slot = self._slots[pos]
        hit = (self._keys[pos] == ids) & (slot >= 0)
        cells = np.where(hit, pos, -1)
        todo = np.flatnonzero(~hit & (slot != _FREE))  # a FREE cell ends the chain: not there
        pos = self._wrap(pos[todo] + 1)  # aligned with todo from here on
        for _ in range(_NARROW):
            if not todo.size:
                return cells
            slot = self._slots[pos]
            hit = (self._keys[pos] == ids[todo]) & (slot >= 0)
            cells[todo[hit]] = pos[hit]
            going = ~hit & (slot != _FREE)
            todo, pos = todo[going], self._wrap(pos[going] + 1)
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
            todo, pos = todo[going], self._wrap(pos[going] + _WINDOW)
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
        if not checked and (len(unique(ids)) != len(ids) or (self._find(ids) >= 0).any()):
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
        cells = unique(cells[cells >= 0])
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
        """Re-insert every live entry into a table of ``capacity`` cells (drops tombstones).

        One pass instead of :meth:`_place`'s rounds: taken in order of their home cells, the entries of an
        empty table each land in the first cell at or after their home that the ones before did not take,
        ``cell[i] = max(home[i], cell[i - 1] + 1)``, a running maximum. The few whose chain runs past the
        last cell are placed by :meth:`_place` (wrapping around to the start).
        """
        ids, slots = self.items()
        capacity = max(_WINDOW, capacity)
        self._keys = np.zeros(capacity, np.int64)
        self._slots = np.full(capacity, _FREE, np.int32)
        self._gone = 0
        home = self._home(ids)
        order = np.argsort(home, kind="stable")
        ids, slots, rank = ids[order], slots[order], np.arange(len(ids))
        cells = np.maximum.accumulate(home[order] - rank) + rank if len(ids) else rank
        inside = cells < capacity
        self._keys[cells[inside]], self._slots[cells[inside]] = ids[inside], slots[inside]
        self._place(ids[~inside], slots[~inside])

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
            at = np.flatnonzero(has)[first]  # where the winners are in todo
            won = todo[at]
            self._gone -= int((self._slots[cells] == _GONE).sum())  # a tombstone reused
            self._keys[cells], self._slots[cells] = ids[won], slots[won]
            # the rest go on from the cell they wanted (now in use) or, with none open, past the window
            pos[todo] = np.where(has, chosen, self._wrap(pos[todo] + width))
            left = np.ones(len(todo), bool)
            left[at] = False
            todo = todo[left]
            width = _WINDOW

    def _window(self, starts: np.ndarray, width: int) -> np.ndarray:
        """``(len(starts), width)`` cells: each start (a cell) and the cells after it (wrapping around)."""
        return self._wrap(starts[:, None] + np.arange(width))

    def _wrap(self, cells: np.ndarray) -> np.ndarray:
        """``cells`` (below twice the cell count: a window is no wider than the table) wrapped around into the
        table, in place (a modulo costs more)."""
        cells[cells >= len(self._keys)] -= len(self._keys)
        return cells
