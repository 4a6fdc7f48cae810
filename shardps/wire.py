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
