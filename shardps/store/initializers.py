"""Initial values of embedding rows: a pure function of (table seed, table name, id).

Counter-based, so a row's first value does not depend on the shard count,
the arrival order or an earlier eviction.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardps.store.ids import GOLDEN, as_ids, mix64, name_salt


def _uniform01(ids: np.ndarray, salt: np.uint64, columns: int, stream: int = 0) -> np.ndarray:
    """Counter-based uniforms in [0, 1): one per (id, column), a pure function of (salt, id, column, stream)."""
    base = mix64(ids.view(np.uint64) ^ salt)[:, None]
    counters = (np.arange(columns, dtype=np.uint64) * np.uint64(2) + np.uint64(stream)) * GOLDEN
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
