"""The built-in models, as model functions: each returns a compiled Keras model.

``cnn`` and ``mlp`` classify images (one input); ``widedeep`` predicts clicks
from inputs ``ids`` (one int64 id per field) and ``dense`` (float features).
"""
from __future__ import annotations

import shardps.keras as sk
from shardps.keras import keras
from shardps.store.initializers import Uniform, Zeros

layers = keras.layers


def _classifier(model) -> object:
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def cnn(input_shape: tuple, num_classes: int):
    """The classic MNIST CNN: conv 5x5x32, pool, conv 5x5x64, pool, dense 1024, dense ``num_classes``."""
    return _classifier(keras.Sequential([
        keras.Input(input_shape, name="x"),
        layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Flatten(),
        layers.Dense(1024, activation="relu", name="dense1"),
        layers.Dense(num_classes, name="dense2"),
    ], name="cnn"))


def mlp(input_shape: tuple, num_classes: int):
    """A small dense net for quick runs and tests: 64 relu units."""
    return _classifier(keras.Sequential([
        keras.Input(input_shape, name="x"), layers.Flatten(), layers.Dense(64, activation="relu", name="dense1"),
        layers.Dense(num_classes, name="dense2")], name="mlp"))


def widedeep(fields: int, dense_features: int, *, embedding_dim: int = 16, optimizer=None, min_count: int = 1,
             max_rows: int | None = None, seed: int = 0):
    """Wide & deep click model: per id an embedding row (table ``emb``) and a wide weight (table ``wide``).

    The deep part is an MLP (64, 32 relu units) over the concatenated
    embeddings and the dense features; the logit adds the wide weights of
    the example's ids. Both tables hold the ids of every field (ids of
    different fields must differ, as the ``ctr`` and ``criteo`` ids do).
    Embeddings start uniform in +-0.05, wide weights at zero.
    """
    ids = keras.Input((fields,), dtype="int64", name="ids")
    dense = keras.Input((dense_features,), name="dense")
    table = {"optimizer": optimizer, "min_count": min_count, "max_rows": max_rows, "seed": seed}
    emb = sk.Embedding("emb", embedding_dim, initializer=Uniform(-0.05, 0.05), name="emb", **table)(ids)
    wide = sk.Embedding("wide", 1, initializer=Zeros(), name="wide", **table)(ids)
    h = layers.Concatenate()([layers.Flatten()(emb), dense])
    h = layers.Dense(64, activation="relu", name="deep1")(h)
    h = layers.Dense(32, activation="relu", name="deep2")(h)
    logit = layers.Add()([layers.Dense(1, name="deep_out")(h), keras.ops.sum(wide, axis=1)])
    model = keras.Model({"ids": ids, "dense": dense}, keras.ops.squeeze(logit, axis=-1), name="widedeep")
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
                           keras.metrics.BinaryCrossentropy(from_logits=True, name="logloss"),
                           keras.metrics.AUC(num_thresholds=1000, from_logits=True, name="auc")])
    return model
