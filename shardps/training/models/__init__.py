"""Model functions: the built-in ones (``cnn``, ``mlp``, ``widedeep``) and a user's ``module:function``.

A model function takes no arguments and returns a compiled ``keras.Model``
(see :class:`shardps.training.replica.Replica`); it is called in every worker
process, so it must be picklable (a module-level function, or a
``functools.partial`` of one).
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Callable

MODELS = ("cnn", "mlp", "widedeep")


def load_function(spec: str) -> Callable:
    """The function ``module:function`` names (``module`` importable from the current folder or sys.path);
    it is sent to the workers by value.

    Raises ``ValueError`` naming what is missing.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"Argument `model` must be one of {MODELS} or 'module:function'. Received: {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `shardps` script's path starts at its own folder
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Argument `model`: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"Argument `model`: module {module_name!r} has no function {attr!r}")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(module)  # workers need not find the module on their own path
    return fn


def model_function(config, input_shape: tuple, num_classes: int) -> Callable:
    """The function that builds ``config.model``: the user's, or a built-in one for this data's shape."""
    if callable(config.model):
        return config.model
    if config.model not in MODELS:
        return load_function(config.model)
    from shardps.training.models import builtin
    from shardps.store.optim import OPTIMIZERS

    if config.model == "widedeep":
        return functools.partial(builtin.widedeep, *input_shape, embedding_dim=config.embedding_dim,
                                 optimizer=OPTIMIZERS[config.table_optimizer](lr=config.table_lr),
                                 min_count=config.min_count, max_rows=config.max_rows, seed=config.seed)
    return functools.partial(getattr(builtin, config.model), tuple(input_shape), num_classes)
