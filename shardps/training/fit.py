"""``shardps.fit``: train a user's Keras model on the parameter server, as ``model.fit`` would in one process."""
from __future__ import annotations

from typing import Callable

import numpy as np

from shardps.training.config import TrainConfig
from shardps.training.feed import Examples, RayExamples, RunData
from shardps.training.history import History
from shardps.training.run import Progress, run


def fit(build: Callable, x, y=None, *, validation_data=None, label: str = "label", epochs: float | None = None,
        steps: int | None = None, batch_size: int = 32, shuffle: bool = True, progress: Progress | None = None,
        **options) -> History:
    """Train the model ``build()`` returns on ``x`` (and ``y``) with sharded parameter actors; blocks until done.

    ``build`` takes no arguments and returns a compiled ``keras.Model`` (its
    loss and metrics are used, its optimizer is not); it is called in every
    worker process, so it must be picklable (a module-level function or a
    ``functools.partial`` of one). Its ``shardps.keras.Embedding`` layers'
    rows live in shard tables; its other trainable variables are dense keys.

    Data: ``x`` an array (one-input model) or a dict of arrays keyed by the
    model's input names, with labels ``y``; or a ``ray.data.Dataset`` whose
    column ``label`` holds the labels and whose other columns are the
    model's inputs, by name (``y`` None). ``validation_data``: ``(x, y)`` or
    a Ray dataset; evaluated once per epoch, or every ``eval_every`` steps
    (async modes: points the workers pass within one 0.5 s poll are evaluated once).
    Arrays are split among the workers at random and reshuffled every epoch
    (``shuffle=False``: contiguous parts read in order); a Ray dataset is
    split into ``num_workers`` equal parts read in order (shuffle it
    yourself, e.g. ``ds.random_shuffle()``), the last ``len % num_workers``
    rows left out.

    ``epochs`` (default 1) or ``steps`` (per worker); every other option is a
    :class:`TrainConfig` field: ``mode``, ``num_shards``, ``num_workers``,
    ``optimizer`` (default ``shardps.Adam(1e-3)``; scaled by the number of
    workers in sync mode unless ``scale_lr=False``), ``checkpoint_dir``,
    ``resume``, ``logdir``, ``address``, ...

    Returns:
        a :class:`History`; ``.history`` maps ``"loss"``, each metric and
        ``"val_..."`` ones to a value per evaluation, as Keras's does.

    Raises:
        ValueError / TypeError: a bad option (named), model or data (before anything starts).
    """
    if epochs is None and steps is None:
        epochs = 1.0
    config = TrainConfig(model=build, epochs=epochs, steps=steps, batch_size=batch_size,
                         **{"eval_every": None, **options})
    data = RunData(_examples(x, y, label, shuffle, "x"), None if validation_data is None
                   else _validation(validation_data, label), name="custom")
    return run(config, build, data, progress=progress)


def _examples(x, y, label: str, shuffle: bool, role: str):
    if _is_ray_dataset(x):
        if y is not None:
            raise ValueError(f"`{role}` is a Ray dataset: its labels are its column {label!r}, so `y` must be None")
        return RayExamples(x, label)
    if isinstance(x, tuple) and y is None and len(x) == 2:
        x, y = x
    if y is None:
        raise ValueError(f"`y` (the labels of `{role}`) is missing: pass arrays x and y, or a Ray dataset")
    if not isinstance(x, (dict, np.ndarray, list)):
        raise TypeError(f"`{role}` must be an array, a dict of arrays or a ray.data.Dataset. Received: {type(x)}")
    return Examples(x, y, shuffle=shuffle)


def _validation(data, label: str):
    if _is_ray_dataset(data):
        return RayExamples(data, label)
    if not (isinstance(data, tuple) and len(data) == 2):
        raise ValueError("`validation_data` must be (x, y) or a ray.data.Dataset")
    return Examples(*data)


def _is_ray_dataset(x) -> bool:
    return type(x).__module__.startswith("ray.data") and hasattr(x, "iter_batches")
