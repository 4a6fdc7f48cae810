"""Checkpoints written without Ray, as ``Router.save`` writes them, for tests of reading them back."""
import json

import numpy as np

from shardps import Adagrad
from shardps.store import checkpoint
from shardps.store.tables import TableSpec

DIM = 2


def rows(ids, optimizer=Adagrad(lr=0.1), dim=DIM, count_slots=0):
    """A table's rows as a checkpoint holds them (every field the shard exports)."""
    n = len(ids)
    return {"ids": np.asarray(ids, np.int64), "params": np.ones((n, dim), np.float32),
            "steps": np.ones(n, np.int64), "touched": np.arange(n, dtype=np.int64),
            "counts": np.zeros(count_slots, np.uint8),
            **{f"slot.{s}": np.ones((n, dim), np.float32) for s in optimizer.slots()}}


def write(path, *, tables=None, params=None, state=None):
    """A checkpoint written by :func:`checkpoint.write` (as ``Router.save`` writes it), without Ray."""
    params = {"w": np.zeros(3, np.float32)} if params is None else params
    state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v)} for k, v in params.items()} if state is None else state
    tables = {"t": (TableSpec("t", DIM).to_json(), rows([1, 2, 3]))} if tables is None else tables
    header = {"store": "s", "step": 1, "num_shards": 1, "block_bytes": 65536,
              "optimizer": {"name": "adam", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-07},
              "shards": [{"version": 0, "applied": {}}]}
    return checkpoint.write(path, header=header, params=params, state=state, steps=dict.fromkeys(params, 0),
                            tables=tables)


def edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
