"""Wide & deep click-through model whose embeddings live in parameter-server tables.

Per field f an embedding row from table ``emb/<f>`` and a wide weight from
table ``wide/<f>`` (dim 1); the deep part is an MLP (64, 32 relu units)
over the concatenated embeddings and the dense features, held as ordinary
dense keys. A batch touches only the rows of its own ids: the worker pulls
those (deduplicated per table), the gradients are taken with respect to the
gathered rows, never over a vocabulary.
"""
from __future__ import annotations

import numpy as np

from shardps.training.ctr import auc, logloss, sigmoid
from shardps.training.models.keras_model import keras, layers, limit_tf_threads, tf


class WideDeepModel:
    """Same protocol as :class:`~shardps.training.models.keras_model.KerasModel`, plus tables.

    ``set_weights`` takes the dense keys and, under each table's name, the
    rows of the ids :meth:`rows_needed` asked for; ``compute_gradients``
    returns each table's gradient as ``(ids, grads)`` under its name.
    """

    def __init__(self, fields: int, dense_features: int, *, embedding_dim: int = 16, seed: int = 0):
        limit_tf_threads()
        keras.utils.set_random_seed(seed)
        self.fields, self.embedding_dim = fields, embedding_dim
        self.tables = {**{f"emb/{f}": embedding_dim for f in range(fields)}, **{f"wide/{f}": 1 for f in range(fields)}}
        self.net = keras.Sequential([keras.Input((fields * embedding_dim + dense_features,)),
                                     layers.Dense(64, activation="relu", name="deep1"),
                                     layers.Dense(32, activation="relu", name="deep2"),
                                     layers.Dense(1, name="deep_out")], name="widedeep")
        self._vars = {f"{layer.name}/{v.name}": v for layer in self.net.layers for v in layer.trainable_weights}
        self._rows: dict[str, np.ndarray] = {}
        self._ids: dict[str, np.ndarray] = {}
        self._grad_fn = tf.function(self._gradients, reduce_retracing=True)
        self._logit_fn = tf.function(self._logits, reduce_retracing=True)

    @property
    def names(self) -> list[str]:
        return list(self._vars)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in self._vars.items()}

    def rows_needed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """``{table: unique ids}`` of the examples ``x``: what to pull before :meth:`set_weights`."""
        per_field = [np.unique(x["ids"][:, f]) for f in range(self.fields)]
        return {**{f"emb/{f}": u for f, u in enumerate(per_field)}, **{f"wide/{f}": u for f, u in enumerate(per_field)}}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Dense keys, plus the rows pulled for :meth:`rows_needed` (in its id order) under each table name."""
        for name, v in self._vars.items():
            v.assign(weights[name])
        self._rows = {name: weights[name] for name in self.tables if name in weights}

    def _inputs(self, x: np.ndarray) -> tuple[list, list, list]:
        """Per field: its rows, wide weights and each example's position in them (from the pulled rows)."""
        emb, wide, where = [], [], []
        for f in range(self.fields):
            unique, inverse = np.unique(x["ids"][:, f], return_inverse=True)
            if len(unique) != len(self._rows[f"emb/{f}"]):
                raise ValueError(f"field {f}: rows for {len(self._rows[f'emb/{f}'])} ids were set, the batch has "
                                 f"{len(unique)}: pull rows_needed(x) of this batch first")
            emb.append(tf.convert_to_tensor(self._rows[f"emb/{f}"]))
            wide.append(tf.convert_to_tensor(self._rows[f"wide/{f}"]))
            where.append(tf.convert_to_tensor(inverse.reshape(-1)))
            self._ids[f"emb/{f}"] = self._ids[f"wide/{f}"] = unique
        return emb, wide, where

    def _logits(self, emb, wide, where, dense, training=False):
        deep_in = tf.concat([tf.gather(e, i) for e, i in zip(emb, where)] + [dense], axis=1)
        wide_sum = tf.add_n([tf.gather(w, i) for w, i in zip(wide, where)])
        return (self.net(deep_in, training=training) + wide_sum)[:, 0]

    def _gradients(self, emb, wide, where, dense, y):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            tape.watch(wide)
            logits = self._logits(emb, wide, where, dense, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, list(self._vars.values()) + emb + wide)
        return [tf.convert_to_tensor(g) for g in grads], loss  # gather's IndexedSlices -> (unique ids, dim)

    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[dict, float]:
        """Gradients of the mean logloss: dense keys -> array, tables -> ``(ids, grads)``; and the loss."""
        emb, wide, where = self._inputs(x)
        grads, loss = self._grad_fn(emb, wide, where, tf.convert_to_tensor(x["dense"]), tf.convert_to_tensor(y))
        grads = [g.numpy() for g in grads]
        out = dict(zip(self._vars, grads))
        tables = [f"emb/{f}" for f in range(self.fields)] + [f"wide/{f}" for f in range(self.fields)]
        out.update({name: (self._ids[name], g) for name, g in zip(tables, grads[len(self._vars):])})
        return out, float(loss)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Click probabilities of ``x``, from the rows set for ``rows_needed(x)``."""
        emb, wide, where = self._inputs(x)
        return sigmoid(self._logit_fn(emb, wide, where, tf.convert_to_tensor(x["dense"])).numpy().astype(np.float64))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """``{"accuracy", "logloss", "auc"}`` on ``(x, y)`` (rows set for ``rows_needed(x)``)."""
        p = self.predict(x)
        return {"accuracy": float(np.mean((p > 0.5) == (y == 1))), "logloss": logloss(y, p), "auc": auc(y, p)}
