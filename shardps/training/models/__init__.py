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


BUILTIN_ARGS = ("embedding_dim", "table_optimizer", "table_lr", "min_count", "max_rows", "seed")  # of TrainConfig


def description(config, input_shape: tuple | None = None, num_classes: int | None = None) -> dict | None:
    """JSON naming the model function of ``config`` (stored with the run's checkpoints, rebuilt by
    :func:`from_description` for ``shardps export``): a built-in with the data's shape and the settings it
    was built with, or ``{"function": "module:function"}``. None for a function without an importable
    name (a lambda, a closure, a ``functools.partial``, or defined in ``__main__``)."""
    model = config.model
    if callable(model):
        module, name = getattr(model, "__module__", None), getattr(model, "__qualname__", "<")
        importable = module and module != "__main__" and "<" not in name and not isinstance(model, functools.partial)
        return {"function": f"{module}:{name}"} if importable else None
    if model not in MODELS:
        return {"function": model}
    if input_shape is None:
        return None
    return {"builtin": model, "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
            **{arg: getattr(config, arg) for arg in BUILTIN_ARGS}}


def saved_description(manifest: dict, where) -> dict:
    """The model description in a checkpoint's ``manifest`` (read from ``where``). Raises ``ValueError`` when it
    names none: the run's model function had no importable name."""
    described = manifest.get("meta", {}).get("model")
    if not described:
        raise ValueError(f"the checkpoint in {where} does not name its model function (the run's model had no "
                         f"importable name): pass it (shardps export --model module:function)")
    return described


def from_description(described: dict) -> Callable:
    """The model function :func:`description` described. Raises ``ValueError`` if it cannot be rebuilt."""
    if not isinstance(described, dict):
        raise ValueError(f"a model description must be a JSON object. Received: {described!r:.200}")
    if "function" in described:
        return load_function(described["function"])
    try:
        return _builtin(described["builtin"], tuple(described["input_shape"]), int(described["num_classes"]),
                        **{arg: described[arg] for arg in BUILTIN_ARGS})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot rebuild the model from its description {described!r:.200}: {exc!r}") from None


def model_function(config, input_shape: tuple, num_classes: int) -> Callable:
    """The function that builds ``config.model``: the user's, or a built-in one for this data's shape."""
    if callable(config.model):
        return config.model
    if config.model not in MODELS:
        return load_function(config.model)
    return _builtin(config.model, tuple(input_shape), num_classes, **{arg: getattr(config, arg) for arg in BUILTIN_ARGS})


def _builtin(name: str, input_shape: tuple, num_classes: int, *, embedding_dim: int, table_optimizer: str,
             table_lr: float, min_count: int, max_rows: int | None, seed: int) -> Callable:
    """The built-in model function ``name`` for this data's shape; the table settings are widedeep's.
    Raises ``ValueError`` for an unknown name or rule."""
    from shardps.training.models import builtin
    from shardps.store.optim import OPTIMIZERS

    if name not in MODELS or table_optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown model {name!r} or table optimizer {table_optimizer!r}")
    if name == "widedeep":
        return functools.partial(builtin.widedeep, *input_shape, embedding_dim=embedding_dim,
                                 optimizer=OPTIMIZERS[table_optimizer](lr=table_lr), min_count=min_count,
                                 max_rows=max_rows, seed=seed)
    return functools.partial(getattr(builtin, name), input_shape, num_classes)
