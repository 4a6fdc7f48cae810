"""TensorFlow models behind a small protocol.

A model has named dense weights as numpy arrays (``names``, ``get_weights``
/ ``set_weights``), ``compute_gradients(x, y) -> (grads, loss)`` and
``evaluate(x, y) -> {"accuracy": ..., ...}``. Names are
``"<layer>/<variable>"``, identical in every process. A model with
embedding tables (``widedeep``) also lists them in ``tables`` (name -> dim)
and says which rows a batch needs (``rows_needed(x) -> {table: ids}``);
``set_weights`` then takes those rows too, and ``compute_gradients`` gives a
table's gradient as ``(ids, grads)``. Dense models have no tables.
"""
from __future__ import annotations

MODELS = ("cnn", "mlp", "widedeep")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0,
                embedding_dim: int = 16):
    """Build a model by name. ``widedeep`` takes ``input_shape = (id fields, dense features)``.

    Raises ``ValueError`` for an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}")
    if name == "widedeep":
        from shardps.training.models.widedeep import WideDeepModel

        return WideDeepModel(*input_shape, embedding_dim=embedding_dim, seed=seed)
    from shardps.training.models.keras_model import KerasModel

    return KerasModel(name, input_shape, num_classes, seed=seed)
