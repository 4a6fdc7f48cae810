"""``shardps.keras.Embedding``: a Keras layer whose rows live in a shard table.

The layer holds no vocabulary-sized variable. Before each step the trainer
pulls the rows of the batch's unique ids from the shards and *binds* them to
the layer's table (:class:`RowLookup`: sorted ids and their rows, two
variables whose first dimension changes with every batch); the layer finds
each id's row with a binary search and gathers it, in the graph. The
gradient with respect to the bound rows is one row per unique id: that is
what goes back to the shards, ``(unique ids, grads)``.

Outside a shardps trainer (no rows bound) calling the layer raises
``RuntimeError``: its rows are on the shards, not in the model.
"""
from __future__ import annotations

import numpy as np

from shardps.store.initializers import Uniform
from shardps.store.optim import Adagrad
from shardps.store.tables import TableSpec
from shardps.training.models.tf_setup import tensorflow_start_up_silenced

with tensorflow_start_up_silenced():
    import keras
    import tensorflow as tf

COMBINERS = (None, "sum", "mean")


class RowLookup:
    """The rows of one table bound for the current batch: ``ids`` (sorted, unique) and ``rows`` (one per id).

    Plain TensorFlow variables with an open first dimension, shared by every
    layer of the table; not Keras weights (they are never saved with the
    model nor trained by Keras). A plain class, so Keras does not track it.
    """

    def __init__(self, table: str, dim: int):
        self.table, self.dim = table, dim
        self.ids = tf.Variable(tf.zeros([0], tf.int64), shape=tf.TensorShape([None]), trainable=False,
                               name=f"{table}/ids")
        self.rows = tf.Variable(tf.zeros([0, dim]), shape=tf.TensorShape([None, dim]), name=f"{table}/rows")
        self.bound = False

    def bind(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Use ``rows`` for ``ids`` (ascending, unique) from now on. An empty batch binds one zero row."""
        ids, rows = self.padded(ids, rows)
        self.ids.assign(ids)
        self.rows.assign(rows)
        self.bound = True

    def padded(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`bind` assigns for ``(ids, rows)``: them, or one zero row for none (a lookup needs one)."""
        if len(ids) == 0:
            return np.zeros(1, np.int64), np.zeros((1, self.dim), np.float32)
        return ids, rows


@keras.saving.register_keras_serializable(package="shardps")
class Embedding(keras.layers.Layer):
    """Embedding rows of shard table ``table``, looked up by int64 feature ids.

    Args:
        table: the table's name; layers with the same name share its rows
            (and must agree on ``dim`` and the table's settings).
        dim: values per row.
        initializer: a new row's first value (``shardps.Uniform``, ``Normal``
            or ``Zeros``; default ``Uniform(-0.05, 0.05)``, as Keras's).
        optimizer: the per-row rule applied on the shards (default
            ``Adagrad(0.05)``); the model's dense optimizer is ``fit``'s.
        min_count: pushes an id needs before it gets a row.
        max_rows: rows of the whole table at most (least recently updated evicted).
        combiner: None: one row per id, output shape ``ids.shape + (dim,)``;
            ``"sum"`` or ``"mean"``: multi-hot, the rows of each example's
            last axis combined into one, output ``ids.shape[:-1] + (dim,)``;
            entries equal to ``pad_id`` are padding and count for nothing
            (an example with none: zeros).
        pad_id: the padding id of a multi-hot input (combiner only).

    Raises:
        ValueError: a bad argument (as ``TableSpec``), an unknown combiner.
    """

    def __init__(self, table: str, dim: int, *, initializer=None, optimizer=None, min_count: int = 1,
                 max_rows: int | None = None, combiner: str | None = None, pad_id: int = -1, seed: int = 0, **kwargs):
        self.spec = TableSpec(table, dim, initializer=initializer or Uniform(-0.05, 0.05),
                              optimizer=optimizer or Adagrad(lr=0.05), min_count=min_count, max_rows=max_rows,
                              seed=seed)
        if combiner not in COMBINERS:
            raise ValueError(f"Argument `combiner` must be one of {COMBINERS}. Received: {combiner!r}")
        if not isinstance(pad_id, (int, np.integer)) or isinstance(pad_id, bool):
            raise ValueError(f"Argument `pad_id` must be an integer. Received: {pad_id!r}")
        super().__init__(**kwargs)
        self.table, self.dim, self.combiner, self.pad_id = table, dim, combiner, int(pad_id)
        self.lookup: RowLookup | None = None  # set by the trainer: the table's bound rows

    def ids_needed(self, ids: np.ndarray) -> np.ndarray:
        """The ids of ``ids`` (an input batch of this layer) that need a row: all, less padding with a combiner."""
        flat = np.asarray(ids).reshape(-1)
        return flat[flat != self.pad_id] if self.combiner else flat

    def call(self, ids):
        if self.lookup is None or not self.lookup.bound:
            raise RuntimeError(f"shardps.keras.Embedding {self.table!r}: its rows live in the shards; train or "
                               f"evaluate the model through shardps (its rows are bound per batch there)")
        ids = tf.cast(ids, tf.int64)
        positions = tf.searchsorted(self.lookup.ids, tf.reshape(ids, [-1]))
        positions = tf.minimum(positions, tf.shape(self.lookup.ids, out_type=positions.dtype)[0] - 1)  # padding
        rows = tf.reshape(tf.gather(self.lookup.rows, positions), tf.concat([tf.shape(ids), [self.dim]], 0))
        return self.combine(ids, rows)

    def combine(self, ids, rows):
        """The output given ``rows``, the rows of ``ids``: them, or per example their sum or mean less padding.

        In ``keras.ops``, so that an exported model (``shardps export``) computes it with standard Keras.
        """
        if not self.combiner:
            return rows
        ops = keras.ops
        real = ops.expand_dims(ops.cast(ops.not_equal(ids, self.pad_id), rows.dtype), -1)
        total = ops.sum(rows * real, axis=-2)
        if self.combiner == "sum":
            return total
        return total / ops.maximum(ops.sum(real, axis=-2), 1.0)

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        return (shape[:-1] if self.combiner else shape) + (self.dim,)

    def get_config(self) -> dict:
        return {**super().get_config(), "table": self.table, "dim": self.dim, "combiner": self.combiner,
                "pad_id": self.pad_id, "min_count": self.spec.min_count, "max_rows": self.spec.max_rows,
                "seed": self.spec.seed}
