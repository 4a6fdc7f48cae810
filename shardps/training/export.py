"""Export: a checkpoint as a plain Keras model, to serve without shardps or Ray.

:func:`export` builds the model (with the model function the checkpoint
names, or the one given), sets the checkpoint's dense weights in it and
replaces every :class:`shardps.keras.Embedding` layer by standard Keras parts
holding its table's rows: ``IntegerLookup(vocabulary=the table's ids)`` (an
id without a row: index 0) and ``Embedding(rows + 1, dim)`` whose row 0 is
zeros, shared by every layer of one table; a combiner is the same
``keras.ops`` arithmetic the layer does. The file loads with
``keras.models.load_model`` in a process that imports neither shardps nor Ray.

Ids without a row (never pushed, below ``min_count``, or evicted) read
zeros. That is their value in training for tables initialized with
``Zeros()`` (widedeep's ``wide``); ``Uniform`` and ``Normal`` tables gave
them their initial value, a hash of the id that standard layers cannot
compute, so their predictions can differ where such ids occur.

The exported model is not compiled (the loss may be the user's own
function): load it and ``predict``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from shardps.keras import Embedding, keras
from shardps.store import checkpoint
from shardps.training.models import from_description, saved_description
from shardps.training.replica import Replica


def export(checkpoint_dir: str | os.PathLike, path: str | os.PathLike, build: Callable | None = None) -> Path:
    """Write the model of the latest checkpoint in ``checkpoint_dir`` as a plain Keras model file ``path``.

    ``build``: the model function the run trained (default: the one the
    checkpoint names: a built-in model, or a ``module:function`` that is
    imported and called: export only checkpoints you trust, or pass
    ``build``). Blocks until the file is written; returns its path.

    Raises:
        FileNotFoundError: no checkpoint in ``checkpoint_dir``.
        ValueError: ``path`` does not end in ``.keras``; the checkpoint is
            unreadable, names no model function and ``build`` is None, or
            does not hold this model's weights and tables (named).
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"the exported model's file name must end in .keras (Keras's format). Received: {path}")
    saved = checkpoint.read(checkpoint_dir)
    if build is None:
        build = from_description(saved_description(saved.manifest, checkpoint_dir))
    replica = Replica(build)
    replica.check_saved(saved, checkpoint_dir)
    replica.set_weights(saved.params)
    served = plain_model(replica.model, saved.tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    served.save(path)
    return path


def plain_model(model, tables: dict) -> "keras.Model":
    """``model`` (functional or Sequential) with each shardps Embedding layer replaced by standard layers
    holding ``tables[name]`` (``{"ids", "params"}``, as a checkpoint holds them); other layers are reused."""
    graph = getattr(model, "_functional", None) or model  # a Sequential model's graph is a functional one inside
    model = keras.Model(graph.input, graph.output, name=model.name)  # functional (clone's call_function needs
    # it) and not compiled (cloning a compiled model re-creates its loss, which may be the user's own function)
    lookups: dict[str, Callable] = {}

    def call(layer, *args, **kwargs):
        if not isinstance(layer, Embedding):
            return layer(*args, **kwargs)
        if layer.table not in lookups:
            lookups[layer.table] = _table_lookup(layer.table, layer.dim, tables[layer.table])
        return layer.combine(args[0], lookups[layer.table](args[0]))

    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def _table_lookup(name: str, dim: int, rows: dict) -> Callable:
    """ids -> rows of the table: an IntegerLookup of its ids then an Embedding of its rows (index 0: zeros)."""
    ids, params = rows["ids"], rows["params"].astype(np.float32)
    if len(ids) == 0:  # IntegerLookup needs a vocabulary: one id, whose row is zeros like an unknown id's
        ids, params = np.zeros(1, np.int64), np.zeros((1, dim), np.float32)
    free = -1 - np.arange(len(ids) + 1, dtype=np.int64)
    oov_token = int(free[~np.isin(free, ids)][0])  # a value that is not an id (IntegerLookup drops it otherwise)
    index = keras.layers.IntegerLookup(num_oov_indices=1, oov_token=oov_token, name=f"{name}_ids")
    index.set_vocabulary(ids)  # (not the constructor's: that would write every id into the model's JSON config)
    embedding = keras.layers.Embedding(len(ids) + 1, dim, name=f"{name}_rows")
    embedding.build((None,))
    embedding.set_weights([np.concatenate([np.zeros((1, dim), np.float32), params])])
    return lambda x: embedding(index(x))

