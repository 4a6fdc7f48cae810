"""A shard's dense parameters: one flat buffer per dtype, with its optimizer state.

Each key the shard holds is one *segment* (a contiguous range) of the
buffer of its dtype, in registration order; the router sends data for a run
of segments as one packed array, so an update is a handful of vectorised
numpy expressions over buffer slices (:mod:`shardps.store.update`), never a
Python loop over keys. Plain classes: no Ray.
"""
from __future__ import annotations

import numpy as np

from shardps.store import update
from shardps.store.placement import SegmentState
from shardps.store.wire import from_wire, one_array, split, to_wire


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
        cut = off[1:] != off[:-1] + size[:-1]
        if by_step:
            step = self.steps[ids]
            cut |= step[1:] != step[:-1]
        bounds = np.concatenate([[0], np.flatnonzero(cut) + 1, [len(ids)]])
        data_at = np.concatenate([[0], np.cumsum(size)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                yield ids[a:b], int(off[a]), int(off[b - 1] + size[b - 1]), int(data_at[a])

    def answer(self, ids):
        """The wire form of the values of segments ``ids`` (None: all), as :func:`~shardps.store.wire.join`
        would send them: one view per segment, or (one, small or many segments) their contiguous runs in
        one array. Ray serialises it on return: no aliasing."""
        everything, ids = ids is None, self.check_ids(ids)
        if not one_array(int(self.sizes[ids].sum()) * self.dtype.itemsize, len(ids)):
            return [self.params[o:o + n] for o, n in zip(self.offsets[ids].tolist(), self.sizes[ids].tolist())]
        if everything:  # one run: the whole buffer
            return to_wire(self.params)
        runs = [self.params[lo:hi] for _, lo, hi, _ in self.runs(ids, by_step=False)]
        return to_wire(runs[0] if len(runs) == 1 else np.concatenate(runs))

    def decode(self, ids: np.ndarray, entry) -> list[np.ndarray]:
        """One message's data for ``ids`` as a list of 1-D arrays; raises ``ValueError`` if it does not fit."""
        other_ids, data = entry if entry is not None else (None, None)
        parts = [] if data is None else [from_wire(d, self.dtype) for d in (data if isinstance(data, list) else [data])]
        sizes = self.sizes[ids]
        fits = (len(parts) == 1 and parts[0].size == sizes.sum()) or \
            (len(parts) == len(ids) and all(p.size == n for p, n in zip(parts, sizes)))
        if not fits or not np.array_equal(self.check_ids(other_ids), ids):
            raise ValueError(f"push message does not match the {self.dtype} segments")
        return parts


def _gradient(parts: list[np.ndarray]):
    """One message's gradient for a piece, or the tuple of several (sync mode: ``update`` applies their mean)."""
    return parts[0] if len(parts) == 1 else tuple(parts)


class DenseStore:
    """Every dtype's buffer of one shard. ``slots``: the optimizer's state arrays per element."""

    def __init__(self, slots: tuple[str, ...]):
        self._slots = tuple(slots)
        self._groups: dict[str, _Group] = {}

    @property
    def segments(self) -> int:
        """Segments held (one per key and shard)."""
        return int(sum(len(g.sizes) for g in self._groups.values()))

    @property
    def keys(self) -> int:
        return int(sum(len(g.keys) for g in self._groups.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(g.params.nbytes for g in self._groups.values()))

    def register(self, message: dict) -> bool:
        """Append segments: ``{dtype: (keys, sizes, data)}``. False if every key is held already (a re-send).

        Raises ``ValueError`` (before changing anything) for keys partly held or sizes that do not fit.
        """
        held = {key for group in self._groups.values() for key in group.keys}
        names = [key for keys, _, _ in message.values() for key in keys]
        if names and held.issuperset(names):
            return False
        if held.intersection(names):
            raise ValueError(f"keys {sorted(held.intersection(names))[:5]} already registered")
        arrays = {dtype: from_wire(data, np.dtype(dtype)) for dtype, (_, _, data) in message.items()}
        for dtype, (keys, sizes, _) in message.items():
            if len(keys) != len(sizes) or int(np.sum(sizes)) != arrays[dtype].size:
                raise ValueError(f"register sizes do not match data for {keys}")
        for dtype, (keys, sizes, _) in message.items():
            group = self._groups.setdefault(dtype, _Group(np.dtype(dtype), self._slots))
            group.append(list(keys), sizes, arrays[dtype])
        return True

    def plan(self, messages: list[dict]) -> list:
        """Validate the dense parts of one or more pushes: ``[(group, ids, pieces)]``. Raises ``ValueError``.

        ``pieces``: ``(buffer start, buffer stop, gradient, optimizer step)``;
        with several messages (sync mode) the gradient is the tuple of theirs,
        averaged while it is applied (see :mod:`shardps.store.update`). A
        message's data is one array for all its segments, or one array per
        segment (large pushes: the router then skips its packing copy).
        """
        plan = []
        for dtype, (ids, _) in (messages[0].items() if messages else ()):
            group = self._groups.get(dtype)
            if group is None:
                raise ValueError(f"holds no {dtype} parameters")
            ids = group.check_ids(ids)
            datas = [group.decode(ids, msg.get(dtype)) for msg in messages]
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

    @staticmethod
    def apply(optimizer, plan: list) -> None:
        """Apply a :meth:`plan` (one update; the mean of several messages) and count a step per segment."""
        update.apply(optimizer, [(group, *piece) for group, _, pieces in plan for piece in pieces])
        for group, ids, _ in plan:
            group.steps[ids] += 1

    def answer(self, request: dict | None) -> dict:
        """Current values: ``{dtype: segment ids or None}`` (None: everything) -> ``{dtype: data}``."""
        request = dict.fromkeys(self._groups) if request is None else request
        return {dtype: self._groups[dtype].answer(ids) for dtype, ids in request.items()}

    def load_state(self, message: dict) -> None:
        """Replace optimizer state: ``{dtype: ({slot: data}, steps per segment)}``.

        Raises ``ValueError`` (before changing anything) when a dtype, slot or size does not match.
        """
        for dtype, (state, steps) in message.items():
            group = self._groups.get(dtype)
            if group is None or set(state) != set(group.state) or len(steps) != len(group.steps) \
                    or any(np.size(data) != len(group.params) for data in state.values()):
                raise ValueError(f"optimizer state does not match the {dtype} buffer")
        for dtype, (state, steps) in message.items():
            group = self._groups[dtype]
            for name, data in state.items():
                group.state[name][:] = data
            group.steps[:] = steps

    def export(self) -> dict[str, SegmentState]:
        """Everything held, ``{dtype: SegmentState}`` (the form of :meth:`Layout.slice_dense`)."""
        return {dt: SegmentState(list(g.keys), g.sizes, g.params, g.state, g.steps) for dt, g in self._groups.items()}

    def load(self, held: dict[str, SegmentState]) -> None:
        """Replace everything with ``held`` (as :meth:`export` gives it)."""
        self._groups = {}
        self.register({dt: (s.keys, s.sizes, s.params) for dt, s in held.items()})
        self.load_state({dt: (s.state, s.steps) for dt, s in held.items()})
