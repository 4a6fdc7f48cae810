"""How arrays travel between router and shards.

Ray ships a numpy argument through pickle with an out-of-band buffer, which is
zero-copy for large arrays but costs ~0.2 ms of fixed overhead per call; plain
``bytes`` go through a faster path. Below Ray's inline-object threshold the
copy is cheap and the overhead dominates, so small arrays travel as bytes.
"""
from __future__ import annotations

import numpy as np

INLINE_BYTES = 100 * 1024  # Ray's max_direct_call_object_size: larger args go via the object store


def to_wire(array: np.ndarray):
    """``array`` itself when large (zero-copy through the object store), else its bytes."""
    return array.tobytes() if array.nbytes <= INLINE_BYTES else array


def from_wire(data, dtype: np.dtype) -> np.ndarray:
    """The 1-D array ``to_wire`` sent (read-only when it came as bytes)."""
    return np.frombuffer(data, dtype) if isinstance(data, (bytes, bytearray, memoryview)) else data


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or Inf in ``arr``.

    Large float32/64 arrays: ``x . x`` is finite only if every element is
    (one BLAS pass, no temporary); if it overflows, the exact test decides.
    """
    if arr.size > 4096 and arr.dtype in (np.float32, np.float64):
        flat = arr.reshape(-1)
        with np.errstate(all="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    return bool(np.isfinite(arr).all())


ROWS = "rows"  # in a push message, next to the dtype groups: ``{table: (unique ids, grads)}``


def message_bytes(message: dict) -> int:
    """Bytes of data in a push message ``{dtype: (ids, data), ROWS: {table: (ids, grads)}}``
    (data: wire form, or a list of arrays)."""
    total = sum(ids.nbytes + grads.nbytes for ids, grads in message.get(ROWS, {}).values())
    for _, data in (entry for dtype, entry in message.items() if dtype != ROWS):
        for part in data if isinstance(data, list) else [data]:
            total += len(part) if isinstance(part, (bytes, bytearray)) else part.nbytes
    return total


_JOIN_BYTES = 1 << 20  # below this a packing copy is cheaper than Ray's per-array overhead


def join(parts: list[np.ndarray]):
    """The wire form of one shard's parts: one array (small: concatenated), or the parts themselves (large)."""
    if len(parts) == 1:
        return to_wire(parts[0])
    if sum(p.nbytes for p in parts) >= _JOIN_BYTES and len(parts) <= 256:
        return parts  # Ray copies each into the object store anyway: no packing copy
    return to_wire(np.concatenate(parts))
