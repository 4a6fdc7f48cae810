"""TensorFlow models behind a small protocol.

A model has named weights as numpy arrays (``get_weights`` / ``set_weights``),
``compute_gradients(x, y) -> (grads, loss)`` and ``evaluate(x, y) -> accuracy``.
Names are ``"<layer>/<variable>"``, identical in every process.
"""
from __future__ import annotations

MODELS = ("cnn", "mlp")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0):
    """Build a :class:`~shardps.models.keras_model.KerasModel`. Raises ``ValueError`` for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}")
    from shardps.models.keras_model import KerasModel

    return KerasModel(name, input_shape, num_classes, seed=seed)
