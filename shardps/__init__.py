"""shardps: a sharded parameter server on Ray.

Two packages: :mod:`shardps.store` is the parameter server (shards, router,
tables, checkpoints) and never imports :mod:`shardps.training`, the trainers
and models built on it. Importing shardps starts nothing and imports neither
Ray nor TensorFlow: Ray starts in :func:`launch`, TensorFlow loads with the
training API.
"""
import importlib

__all__ = [
    "launch", "restore", "Router", "Table", "Handle", "ShardUnavailableError",
    "SGD", "Momentum", "Adam", "Adagrad", "FTRL", "Zeros", "Uniform", "Normal",
    "train", "fit", "export", "TrainConfig", "History", "keras",
]

_HOME = {
    "launch": "shardps.store.cluster", "restore": "shardps.store.cluster", "Router": "shardps.store.router",
    "Table": "shardps.store.tables", "Handle": "shardps.store.handle", "ShardUnavailableError": "shardps.store.errors",
    **dict.fromkeys(("SGD", "Momentum", "Adam", "Adagrad", "FTRL"), "shardps.store.optim"),
    **dict.fromkeys(("Zeros", "Uniform", "Normal"), "shardps.store.initializers"),
    "train": "shardps.training.run", "fit": "shardps.training.fit", "export": "shardps.training.export",
    "TrainConfig": "shardps.training.config", "History": "shardps.training.history",
}


def __getattr__(name):
    if name == "keras":  # the Keras layer's module: importing it loads TensorFlow
        return importlib.import_module("shardps.keras")
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'shardps' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
