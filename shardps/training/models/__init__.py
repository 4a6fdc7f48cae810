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

import contextlib
import os
import sys

MODELS = ("cnn", "mlp", "widedeep")


@contextlib.contextmanager
def tensorflow_start_up_silenced():
    """While TensorFlow loads, hide its C++ start-up lines (oneDNN, CUDA stubs, absl's pre-init warning).

    They are printed before TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL``, so
    this points file descriptor 2 at /dev/null meanwhile; only when that
    variable is >= 1 (the CLI sets 3 unless ``-v``). Import errors still
    raise, after stderr is back.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
