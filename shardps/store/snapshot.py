"""A whole store's state <-> a checkpoint: what ``Router.save`` writes and ``restore()`` loads.

Both directions go through :mod:`shardps.store.placement` (``gather_*`` the
shards' parts into whole tensors and tables, ``slice_*`` them back for any
shard count, as a restarted shard does in :mod:`shardps.store.shard.recovery`);
:mod:`shardps.store.checkpoint` writes and reads the files.
"""
from __future__ import annotations

import os
from pathlib import Path

from shardps.store import checkpoint
from shardps.store.optim import optimizer_config
from shardps.store.placement import gather_rows, slice_rows
from shardps.store.tables import TableSpec


def save(router, path: str | os.PathLike, *, step: int = 0, keep: int = 2, meta: dict | None = None) -> Path:
    """Write ``router``'s parameters, optimizer state and tables as a checkpoint under ``path``, with ``meta``
    (a JSON object the caller reads back as ``manifest["meta"]``).

    Blocks until written; returns the checkpoint's folder. Pushes that
    complete while the shards are being read may or may not be included.
    """
    exports = router.call_each(lambda shard: shard.export.remote())
    layout = router.layout
    params, state, steps = layout.gather_dense([dense for dense, _, _ in exports])
    tables = {name: (spec.to_json(), gather_rows([held[name]["rows"] for _, _, held in exports if name in held]))
              for name, spec in layout.tables.items()}
    header = {"store": router.store_id, "step": int(step), "num_shards": router.num_shards,
              "block_bytes": layout.partitioner.block_bytes, "optimizer": optimizer_config(router.optimizer),
              "shards": [shard for _, shard, _ in exports], "meta": dict(meta or {})}
    return checkpoint.write(path, header=header, params=params, state=state, steps=steps, tables=tables, keep=keep)


def load(router, saved: checkpoint.Checkpoint) -> None:
    """Register a checkpoint's keys and tables in a new, empty store and set their state. Blocks.

    Raises ``ValueError`` (from the shards) for state that does not fit.
    """
    manifest = saved.manifest
    if saved.params:
        router.register(saved.params)
        steps = {k["name"]: k["step"] for k in manifest["keys"]}
        layout = router.layout
        messages = [{dt: (held.state, held.steps) for dt, held in layout.slice_dense(s, None, saved.state, steps).items()}
                    for s in range(router.num_shards)]
        router.call_each(lambda shard, message: shard.load_state.remote(message), messages)
    for entry in manifest["tables"]:
        spec = TableSpec.from_json(entry)
        router.register_table(spec.name, spec.dim, initializer=spec.initializer, optimizer=spec.optimizer,
                              dtype=spec.dtype, min_count=spec.min_count, max_rows=spec.max_rows, seed=spec.seed)
        rows = saved.tables[spec.name]
        parts = [slice_rows(rows, spec.name, s, router.num_shards) for s in range(router.num_shards)]
        router.call_each(lambda shard, part: shard.load_table.remote(spec.name, part), parts)
