"""Where every parameter lives: key/block -> shard, and the packed layout.

Placement is a pure function of (key name, tensor size, dtype, number of
shards, block size, seed), computed with xxhash, so every process that knows
the registered keys computes the same layout with no lookup service.

A tensor no larger than one block lives whole on the shard ``xxh64(key) % S``.
A larger tensor is cut into ``n`` equal blocks of ``block_bytes`` (the last
one shorter); consecutive blocks are dealt out as S contiguous runs of
``n // S`` or ``n // S + 1`` blocks, the first run on the shard the key hashes
to. So one big tensor spreads evenly over every shard (in the MNIST CNN one
dense layer holds 98% of the bytes: whole-tensor hashing would put it on one
shard), yet each key still has at most one contiguous range per shard, which
makes packing one slice per key and shard.

What hashing trades away: key order and locality (neighbouring names land on
unrelated shards) and exact balance for small tensors. What it buys: a
placement that needs no coordination and stays balanced as keys are added.

Where the shard actors themselves go is Ray's choice, steered by the custom
resources each asks for (:func:`check_resources`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import xxhash

from shardps.store.ids import as_ids, mix64, name_salt

DEFAULT_BLOCK_BYTES = 64 * 1024  # small enough to balance a 13 MB model over 8 shards
_SEED = 0x5EED  # fixed: placement must be identical in every process and run


@dataclass(frozen=True)
class Segment:
    """One contiguous range of a key's flattened elements on one shard."""

    key: str
    shard: int
    start: int  # first element in the flattened tensor
    stop: int  # one past the last element
    index: int  # position among the shard's segments of the same dtype
    offset: int  # first element in the shard's flat buffer for this dtype

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class KeySpec:
    """A registered key: its shape, dtype and where its pieces live."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class SegmentState(NamedTuple):
    """What a shard holds of one dtype, one entry per segment in buffer order (export, restore, recovery)."""

    keys: list[str]  # the key each segment belongs to
    sizes: list[int] | np.ndarray  # elements per segment
    params: np.ndarray | None  # the segments' parameters, concatenated (None: not carried)
    state: dict[str, np.ndarray]  # optimizer slot -> values, concatenated like params
    steps: np.ndarray  # optimizer steps applied per segment


class HashPartitioner:
    """Deterministic key -> shard placement with block splitting.

    Args:
        num_shards: number of shards, at least 1.
        block_bytes: tensors larger than this are split into blocks of this
            many bytes; must be positive.

    Raises:
        ValueError: for a non-positive ``num_shards`` or ``block_bytes``.
    """

    def __init__(self, num_shards: int, *, block_bytes: int = DEFAULT_BLOCK_BYTES):
        if not isinstance(num_shards, (int, np.integer)) or isinstance(num_shards, bool) or num_shards < 1:
            raise ValueError(f"Argument `num_shards` must be an integer >= 1. Received: {num_shards!r}")
        if not isinstance(block_bytes, (int, np.integer)) or isinstance(block_bytes, bool) or block_bytes < 1:
            raise ValueError(f"Argument `block_bytes` must be a positive integer. Received: {block_bytes!r}")
        self.num_shards = int(num_shards)
        self.block_bytes = int(block_bytes)

    def shard_of(self, key: str) -> int:
        """The shard a key (or the first block of a split key) hashes to."""
        return xxhash.xxh64_intdigest(key.encode(), seed=_SEED) % self.num_shards

    def ranges(self, key: str, size: int, itemsize: int) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` element ranges of a tensor, one per shard at most."""
        block = max(1, self.block_bytes // itemsize)
        num_blocks = -(-size // block)
        first = self.shard_of(key)
        if num_blocks == 1:
            return [(first, 0, size)]
        runs = min(num_blocks, self.num_shards)
        out = []
        for i in range(runs):
            # run i holds blocks [lo, hi): n // runs or n // runs + 1 of them
            lo, hi = i * num_blocks // runs, (i + 1) * num_blocks // runs
            out.append(((first + i) % self.num_shards, lo * block, min(hi * block, size)))
        return out


@dataclass
class Layout:
    """All registered keys and, per shard and dtype, its segments in buffer order."""

    partitioner: HashPartitioner
    keys: dict[str, KeySpec] = field(default_factory=dict)
    # shard -> dtype name -> segments in buffer order
    shard_segments: list[dict[str, list[Segment]]] = field(default_factory=list)
    # embedding tables: name -> TableSpec (rows are placed by a hash of their id: see shard_of_ids below)
    tables: dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        if not self.shard_segments:
            self.shard_segments = [{} for _ in range(self.partitioner.num_shards)]

    @property
    def num_shards(self) -> int:
        return self.partitioner.num_shards

    def spec(self, key: str) -> KeySpec:
        """Shape, dtype and placement of one key. Raises ``KeyError``."""
        try:
            return self.keys[key]
        except (KeyError, TypeError):
            raise KeyError(f"unknown key {key!r}; registered keys: {sorted(self.keys)[:20]}") from None

    def table_spec(self, name: str):
        """The :class:`~shardps.store.tables.TableSpec` of a table. Raises ``KeyError``."""
        try:
            return self.tables[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown table {name!r}; tables: {sorted(self.tables)[:20]}") from None

    def add(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> KeySpec:
        """Place a new key after everything placed so far; returns its spec."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64))
        segments = []
        for shard, start, stop in self.partitioner.ranges(name, size, dtype.itemsize):
            existing = self.shard_segments[shard].setdefault(dtype.str, [])
            offset = existing[-1].offset + existing[-1].size if existing else 0
            seg = Segment(name, shard, start, stop, len(existing), offset)
            existing.append(seg)
            segments.append(seg)
        spec = KeySpec(name, tuple(shape), dtype, tuple(segments))
        self.keys[name] = spec
        return spec

    def slice_dense(self, shard: int, params: dict | None, state: dict, steps: dict) -> dict:
        """What one shard holds of whole tensors, in its buffer order: the inverse of :meth:`gather_dense`.

        Returns ``{dtype: SegmentState}`` cut from ``params`` (key -> array, or None),
        ``state`` (key -> {slot: array}) and ``steps`` (key -> int).
        """
        def cut(segs, dtype, array_of):
            return np.concatenate([np.asarray(array_of(seg.key), dtype).reshape(-1)[seg.start:seg.stop]
                                   for seg in segs])

        out = {}
        for dtype, segs in self.shard_segments[shard].items():
            slots = state[segs[0].key].keys()
            out[dtype] = SegmentState([seg.key for seg in segs], [seg.size for seg in segs],
                                      None if params is None else cut(segs, dtype, params.__getitem__),
                                      {slot: cut(segs, dtype, lambda key, slot=slot: state[key][slot]) for slot in slots},
                                      np.array([steps[seg.key] for seg in segs], np.int64))
        return out

    def gather_dense(self, held: list[dict]) -> tuple[dict, dict, dict]:
        """Whole tensors from every shard's ``{dtype: SegmentState}``: ``(params, state, steps)`` by key,
        as :meth:`slice_dense` takes them."""
        params, state, steps = {}, {}, {}
        for name, spec in self.keys.items():
            flat = np.empty(spec.size, spec.dtype)
            slots: dict[str, np.ndarray] = {}
            for seg in spec.segments:
                group = held[seg.shard][spec.dtype.str]
                flat[seg.start:seg.stop] = group.params[seg.offset:seg.offset + seg.size]
                for slot, buf in group.state.items():
                    slots.setdefault(slot, np.empty(spec.size, spec.dtype))[seg.start:seg.stop] = \
                        buf[seg.offset:seg.offset + seg.size]
                steps[name] = int(group.steps[seg.index])
            params[name] = flat.reshape(spec.shape)
            state[name] = {slot: buf.reshape(spec.shape) for slot, buf in slots.items()}
        return params, state, steps

    def segment_count(self, shard: int) -> int:
        """How many key segments ``shard`` holds (a push tells the shard, see :class:`~shardps.store.dedup.Tag`)."""
        return sum(len(segs) for segs in self.shard_segments[shard].values())

    def shard_blocks(self) -> list[int]:
        """Blocks (of ``block_bytes`` at most) held by each shard."""
        block = self.partitioner.block_bytes
        return [sum(-(-seg.size * np.dtype(dt).itemsize // block) for dt, segs in groups.items() for seg in segs)
                for groups in self.shard_segments]

    def shard_bytes(self) -> list[int]:
        """Bytes of parameters held by each shard."""
        return [
            sum(seg.size * np.dtype(dt).itemsize for dt, segs in groups.items() for seg in segs)
            for groups in self.shard_segments
        ]


def check_resources(name: str, value) -> None:
    """Raise ``ValueError`` naming argument ``name`` unless ``value`` is None or Ray custom resources: a dict
    of resource names to positive amounts, e.g. ``{"ps": 0.01}`` (CPU and GPU are shardps's to set)."""
    if value is None:
        return
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in value.items()):
        raise ValueError(f"Argument `{name}` must map Ray resource names to positive numbers, "
                         f"e.g. {{\"ps\": 0.01}}. Received: {value!r:.80}")
    if {"CPU", "GPU"} & set(value):
        raise ValueError(f"Argument `{name}` names Ray's custom resources; CPU and GPU are not among them. "
                         f"Received: {value!r:.80}")


# ---- table rows: placed by a hash of their id ---------------------------------
def shard_of_ids(ids: np.ndarray, name: str, num_shards: int) -> np.ndarray:
    """The shard of each id of table ``name``: ``mix64(id ^ salt) % num_shards`` (int64 array)."""
    return (mix64(as_ids(ids).view(np.uint64) ^ name_salt(name)) % np.uint64(num_shards)).astype(np.int64)


def rows_per_shard(max_rows: int | None, num_shards: int) -> int | None:
    """Each shard's share of a table's ``max_rows``: ``max_rows // num_shards``, so that the shards together
    never hold more than ``max_rows`` (None: no limit)."""
    return None if max_rows is None else max_rows // num_shards


def slice_rows(rows: dict, name: str, shard: int, num_shards: int) -> dict:
    """One shard's part of a table's rows (``{"ids", "params", ..., "counts"}``, every row): its ids and
    their fields; admission ``counts`` go to every shard. The inverse of :func:`gather_rows`."""
    mine = shard_of_ids(rows["ids"], name, num_shards) == shard
    return {k: (v if k == "counts" else v[mine]) for k, v in rows.items()}


def gather_rows(parts: list[dict]) -> dict:
    """A table's rows from every shard's part (each as :func:`slice_rows` gives it): the fields
    concatenated, admission counters summed (saturating at 255)."""
    out = {field: np.concatenate([p[field] for p in parts]) for field in parts[0] if field != "counts"}
    counts = np.sum([p["counts"].astype(np.int64) for p in parts], axis=0)
    out["counts"] = np.minimum(counts, 255).astype(np.uint8)
    return out
