"""A restarted shard's way back: its replica's state, else its slice of the latest checkpoint.

Ray restarts a crashed shard by running its ``__init__`` again, empty. With
a replica the shard copies it (nothing acknowledged is lost); otherwise it
reloads its part of the latest checkpoint written by its own store with the
same layout (what was pushed after that checkpoint is lost). The slicing is
:mod:`shardps.store.placement`'s, the same as a restore into a new store.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from shardps.store import checkpoint
from shardps.store.placement import HashPartitioner, Layout, slice_rows
from shardps.store.tables import TableSpec


def reconstructed() -> bool:
    """True inside an actor that Ray restarted after a crash."""
    import ray

    with warnings.catch_warnings():  # Ray 2.60 warns from inside its own implementation of this property
        warnings.simplefilter("ignore", DeprecationWarning)
        return ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed


class Recovered(NamedTuple):
    """A shard's state from a checkpoint, in the form of ``ParameterShard.export()``, and its step."""

    dense: dict  # {dtype: SegmentState}
    meta: dict  # {"version", "applied"}
    tables: dict  # {name: {"spec", "rows"}}
    step: int


def from_checkpoint(shard: int, *, checkpoint_dir: str | None, num_shards: int, block_bytes: int,
                    store: str | None = None) -> Recovered | str:
    """Shard ``shard``'s part of the latest checkpoint in ``checkpoint_dir``, or why there is none usable.

    Only a checkpoint written by this store (``store``: its id) with the same layout is used.
    """
    try:
        if checkpoint_dir is None or checkpoint.latest(checkpoint_dir) is None:
            return f"there is no checkpoint in {checkpoint_dir}"
        saved = checkpoint.read(checkpoint_dir)
    except (OSError, ValueError) as exc:
        return f"its checkpoint is unreadable: {exc}"
    manifest = saved.manifest
    if store is not None and manifest.get("store") != store:
        return f"the checkpoint in {checkpoint_dir} was written by another store"
    if (manifest["num_shards"], manifest["block_bytes"]) != (num_shards, block_bytes):
        return f"the checkpoint in {checkpoint_dir} has another layout"
    layout = Layout(HashPartitioner(num_shards, block_bytes=block_bytes))
    for key in manifest["keys"]:
        layout.add(key["name"], tuple(key["shape"]), np.dtype(key["dtype"]))
    dense = layout.slice_dense(shard, saved.params, saved.state, {k["name"]: k["step"] for k in manifest["keys"]})
    meta = manifest.get("shards", [{}] * num_shards)[shard]
    return Recovered(dense, {"version": meta.get("version", 0), "applied": meta.get("applied", {})},
                     shard_tables(manifest, saved.tables, shard, num_shards), manifest["step"])


def shard_tables(manifest: dict, rows: dict, shard: int, num_shards: int) -> dict:
    """One shard's part of a checkpoint's tables: ``{name: {"spec": what register_table sends, "rows"}}``."""
    out = {}
    for entry in manifest["tables"]:
        spec = TableSpec.from_json(entry)
        out[spec.name] = {"spec": spec.for_shard(num_shards),
                          "rows": slice_rows(rows[spec.name], spec.name, shard, num_shards)}
    return out


def replication_restarts(replicas, max_restarts) -> int:
    """Check a store's ``replicas`` (1 or 2) and ``max_restarts``; return the restarts in force.

    ``max_restarts=None`` means 3 with a replica (recovery is a restart),
    else 0 (a restarted shard without a replica needs a checkpoint).
    Raises ``ValueError`` naming the argument.
    """
    if replicas not in (1, 2) or isinstance(replicas, bool):
        raise ValueError(f"Argument `replicas` must be 1 or 2. Received: {replicas!r}")
    if max_restarts is None:
        return 3 if replicas == 2 else 0
    if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
        raise ValueError(f"Argument `max_restarts` must be an integer >= 0. Received: {max_restarts!r}")
    if replicas == 2 and max_restarts == 0:
        raise ValueError("Argument `replicas=2` needs `max_restarts` >= 1: a shard is recovered by restarting it")
    return max_restarts
