"""Keras 3 (TensorFlow backend) implementations of the model protocol."""
from __future__ import annotations

import numpy as np

from shardps.training.models.tf_setup import tensorflow_start_up_silenced

with tensorflow_start_up_silenced():
    import tensorflow as tf
    import keras
    from keras import layers


def limit_tf_threads() -> None:
    """One intra-op and one inter-op thread: many processes share 2 cores. Call before any TF op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TF already initialised in this process: keep its setting
        pass


def _cnn(input_shape, num_classes) -> list:
    """The classic MNIST CNN: conv 5x5x32, pool, conv 5x5x64, pool, dense 1024, dense 10."""
    return [
        layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Flatten(),
        layers.Dense(1024, activation="relu", name="dense1"),
        layers.Dense(num_classes, name="dense2"),
    ]


def _mlp(input_shape, num_classes) -> list:
    """A small dense net for quick runs and tests."""
    return [layers.Flatten(), layers.Dense(64, activation="relu", name="dense1"),
            layers.Dense(num_classes, name="dense2")]


def layer_stack(name: str, input_shape, num_classes: int) -> list:
    """The layers of model ``name`` ("cnn" or "mlp"), for a ``keras.Sequential``."""
    return {"cnn": _cnn, "mlp": _mlp}[name](input_shape, num_classes)


class KerasModel:
    """A Keras classifier with numpy-facing weights and gradients."""

    tables: dict[str, int] = {}  # no embedding tables

    def rows_needed(self, x: np.ndarray) -> dict:
        return {}

    def __init__(self, name: str, input_shape, num_classes: int, *, seed: int = 0):
        limit_tf_threads()
        keras.utils.set_random_seed(seed)
        body = layer_stack(name, input_shape, num_classes)
        self.net = keras.Sequential([keras.Input(tuple(input_shape)), *body], name=name)
        if self.net.non_trainable_variables:
            raise TypeError(f"model {name!r}: stateless training needs every variable trainable")
        self._names = [v.path.split("/", 1)[1] for v in self.net.trainable_variables]  # "conv1/kernel"
        # the weights the next computation uses; Keras variables only give the initial values
        self._weights = dict(zip(self._names, (v.numpy() for v in self.net.trainable_variables)))
        self._grad_fn = tf.function(self._gradients, reduce_retracing=True)
        self._logits_fn = tf.function(self._logits, reduce_retracing=True)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def get_weights(self) -> dict[str, np.ndarray]:
        return dict(self._weights)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Use ``weights`` (name -> array) from now on. Keeps references, copies nothing: do not mutate them."""
        self._weights = {name: weights[name] for name in self._names}

    def _tensors(self) -> list:
        return [tf.convert_to_tensor(self._weights[name]) for name in self._names]

    def _logits(self, weights, x, training=False):
        logits, _ = self.net.stateless_call(weights, [], x, training=training)
        return logits

    def _gradients(self, weights, x, y):
        with tf.GradientTape() as tape:
            tape.watch(weights)
            logits = self._logits(weights, x, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return tape.gradient(loss, weights), loss

    def compute_gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """Gradients of the mean cross-entropy on ``(x, y)`` at the weights set last, and the loss.

        Stateless: the weights go into TensorFlow as function arguments, no
        copy into Keras variables on each step.
        """
        grads, loss = self._grad_fn(self._tensors(), tf.convert_to_tensor(x), tf.convert_to_tensor(y))
        return {name: g.numpy() for name, g in zip(self._names, grads)}, float(loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024) -> dict[str, float]:
        """``{"accuracy": top-1 accuracy on (x, y)}``."""
        correct, weights = 0, self._tensors()
        for i in range(0, len(x), batch_size):
            logits = self._logits_fn(weights, tf.convert_to_tensor(x[i:i + batch_size]))
            correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == y[i:i + batch_size]))
        return {"accuracy": correct / max(1, len(x))}
