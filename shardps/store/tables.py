"""Embedding tables on the client side: :class:`TableSpec` (what a table is) and :class:`Table` (a handle).

A table's rows are addressed by int64 ids and placed by a hash of the id
(:func:`shardps.store.placement.shard_of_ids`); each shard holds its rows in
an :class:`~shardps.store.shard.rows.EmbeddingTable`. ``ps.register_table``
returns a :class:`Table`, ``ps.table(name)`` gives one for a registered
table; both talk to the shards through their Router, one message per shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from shardps.store.initializers import Uniform, initializer_config, initializer_from_config
from shardps.store.optim import Adagrad, optimizer_config, optimizer_from_config
from shardps.store.placement import rows_per_shard

MAX_MIN_COUNT = 255  # admission counters are 8 bits
COUNT_SLOTS = 1 << 20  # admission counters per shard (1 MiB) when min_count > 1
MAX_DIM = 1 << 16  # values per row; a wider vector belongs in a dense key
MAX_ROWS_PER_SHARD = 1 << 31  # the row index numbers a shard's rows with int32


def _is_count(value, low: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class TableSpec:
    """A table's definition: checked once here, stored in checkpoints as :meth:`to_json`.

    ``max_rows``: rows of the whole table at most. Each of S shards keeps at
    most its share, ``max_rows // S`` rows (:meth:`for_shard`), evicting its
    least recently updated ones, so the table never holds more than
    ``max_rows``, also after a restore into another shard count.

    Raises:
        ValueError: a bad name, dim, dtype, seed, min_count or max_rows, an
            initializer or optimizer shardps does not know, or ``Momentum``
            (its decay would need every row every step).
    """

    name: str
    dim: int
    initializer: object = field(default_factory=lambda: Uniform(-0.05, 0.05))  # small: embeddings start near 0
    optimizer: object = field(default_factory=lambda: Adagrad(lr=0.05))  # the usual sparse rule of CTR models
    dtype: np.dtype = np.dtype(np.float32)
    seed: int = 0  # of the initial rows
    min_count: int = 1  # pushes an id needs before it gets a row
    max_rows: int | None = None  # None: no limit

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"table name must be a non-empty string. Received: {self.name!r}")
        try:
            self.name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"table name {self.name!r} cannot be encoded as UTF-8") from None
        for arg in ("dim", "min_count"):
            if not _is_count(getattr(self, arg), 1):
                raise ValueError(f"Argument `{arg}` must be an integer >= 1. Received: {getattr(self, arg)!r}")
        if self.dim > MAX_DIM:
            raise ValueError(f"Argument `dim` must be at most {MAX_DIM} values per row. Received: {self.dim}")
        if self.min_count > MAX_MIN_COUNT:
            raise ValueError(f"Argument `min_count` must be at most {MAX_MIN_COUNT} (8-bit counters). "
                             f"Received: {self.min_count}")
        if self.max_rows is not None and not _is_count(self.max_rows, 1):
            raise ValueError(f"Argument `max_rows` must be an integer >= 1 or None. Received: {self.max_rows!r}")
        if not _is_count(self.seed, 0):
            raise ValueError(f"Argument `seed` must be an integer >= 0. Received: {self.seed!r}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind != "f":
            raise ValueError(f"Argument `dtype` must be a floating-point type. Received: {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        initializer_config(self.initializer)  # raises ValueError for anything else
        optimizer_config(self.optimizer)
        if type(self.optimizer).__name__ == "Momentum":
            raise ValueError("Momentum is not supported for embedding tables: use SGD, Adagrad, Adam or FTRL")

    def for_shard(self, num_shards: int) -> dict:
        """What one of ``num_shards`` shards is sent (:meth:`to_json`, ``max_rows`` its own cap).

        Raises ``ValueError`` when ``max_rows`` leaves a shard no row or more than one shard can index.
        """
        cap = rows_per_shard(self.max_rows, num_shards)
        if cap is not None and not 1 <= cap <= MAX_ROWS_PER_SHARD:
            raise ValueError(f"table {self.name!r}: Argument `max_rows` must give each of {num_shards} shards "
                             f"between 1 and {MAX_ROWS_PER_SHARD} rows (max_rows // shards). Received: {self.max_rows}")
        return {**self.to_json(), "max_rows": cap}

    def to_json(self) -> dict:
        """A JSON-safe dict (initializer and optimizer as their configs); :meth:`from_json` reads it."""
        return {"name": self.name, "dim": int(self.dim), "dtype": self.dtype.str,
                "initializer": initializer_config(self.initializer), "optimizer": optimizer_config(self.optimizer),
                "seed": int(self.seed), "min_count": int(self.min_count),
                "max_rows": None if self.max_rows is None else int(self.max_rows)}

    @classmethod
    def from_json(cls, data: dict) -> "TableSpec":
        """The spec :meth:`to_json` wrote (other fields, as a checkpoint's ``rows``, are ignored).

        Raises ``ValueError`` for missing fields or bad values.
        """
        fields = ("name", "dim", "dtype", "initializer", "optimizer", "seed", "min_count", "max_rows")
        if not isinstance(data, dict) or any(f not in data for f in fields):
            raise ValueError(f"a table spec needs the fields {fields}. Received: {str(data)[:120]}")
        try:
            return cls(data["name"], data["dim"], initializer_from_config(data["initializer"]),
                       optimizer_from_config(data["optimizer"]), data["dtype"], data["seed"], data["min_count"],
                       data["max_rows"])
        except (TypeError, OverflowError) as exc:  # values of the wrong type, or numbers beyond float
            raise ValueError(f"table spec {str(data)[:120]}: {exc}") from None


def table_stats(specs: dict[str, TableSpec], shard_stats: list[dict]) -> dict[str, dict]:
    """Per table: its settings, and its rows and bytes summed over the shards' ``stats()``."""
    out = {}
    for name, spec in specs.items():
        held = [s["tables"].get(name, {"rows": 0, "bytes": 0}) for s in shard_stats]
        config = spec.to_json()
        out[name] = {"dim": spec.dim, "dtype": spec.dtype, "rows": sum(h["rows"] for h in held),
                     "rows_per_shard": [h["rows"] for h in held], "bytes": sum(h["bytes"] for h in held),
                     **{k: config[k] for k in ("initializer", "optimizer", "min_count", "max_rows")}}
    return out


class Table:
    """A handle on one registered table (``ps.table(name)``): pull, push and count its rows.

    Cheap to make and picklable (it is the Router plus a name). Each
    operation sends each shard involved one message with its unique ids.
    """

    def __init__(self, router, name: str):
        self._router = router
        self.spec: TableSpec = router.table_spec(name)  # raises KeyError for an unknown table

    @property
    def name(self) -> str:
        return self.spec.name

    def pull(self, ids, *, wait: bool = True, timeout: float | None = None):
        """Rows for ``ids`` (1-D ints, duplicates allowed): a ``(len(ids), dim)`` array.

        Ids without a row get their initial value; nothing is created.
        ``wait=False`` returns a :class:`~shardps.store.handle.Handle`.

        Raises:
            TypeError, ValueError: ids not 1-D integers below 2**63.
            TimeoutError, ShardUnavailableError: see :meth:`Handle.wait`.
        """
        handle = self._router.pull([], rows={self.name: ids}, wait=False).then(itemgetter(self.name))
        return handle.wait(timeout) if wait else handle

    def push(self, ids, grads, *, wait: bool = True, timeout: float | None = None):
        """Push row gradients: duplicate ids are summed, then each row is updated once.

        Rows are created by their first push (after ``min_count`` pushes).
        Blocking and errors as :meth:`Router.push` (ValueError: grads of the
        wrong shape or dtype, or NaN/Inf; TypeError/ValueError: bad ids).
        """
        return self._router.push({}, rows={self.name: (ids, grads)}, wait=wait, timeout=timeout)

    def push_pull(self, ids, grads, pull_ids, *, wait: bool = True, timeout: float | None = None):
        """Push as :meth:`push`, then pull ``pull_ids`` as :meth:`pull`: one round trip per shard.

        The rows returned include this push.
        """
        handle = self._router.push_pull({}, [], rows={self.name: (ids, grads)}, pull_rows={self.name: pull_ids},
                                        wait=False).then(itemgetter(self.name))
        return handle.wait(timeout) if wait else handle

    def stats(self) -> dict:
        """``{"dim", "dtype", "rows", "rows_per_shard", "bytes", "initializer", "optimizer", "min_count",
        "max_rows"}``: rows and bytes (rows, optimizer state, index) as the shards count them. Blocks."""
        return self._router.tables()[self.name]

    def __len__(self) -> int:
        """Rows held by all shards together. Blocks."""
        return self.stats()["rows"]

    def __repr__(self) -> str:
        return f"Table({self.name!r}, dim={self.spec.dim})"
