"""shardps: a sharded parameter server on Ray.

Importing shardps starts nothing: Ray starts in :func:`launch`, and
TensorFlow is imported only by the training API (:func:`train`).
"""
from shardps.checkpoint import restore
from shardps.cluster import launch
from shardps.errors import ShardUnavailableError
from shardps.optim import SGD, Adagrad, Adam, Momentum
from shardps.partition import HashPartitioner
from shardps.router import Handle, Router
from shardps.shard import ParameterShard

__all__ = [
    "launch", "restore", "Router", "Handle", "HashPartitioner", "ParameterShard",
    "SGD", "Momentum", "Adam", "Adagrad", "ShardUnavailableError",
    "train", "TrainConfig", "History",
]

_LAZY = {"train": "shardps.trainers", "TrainConfig": "shardps.config", "History": "shardps.trainers"}


def __getattr__(name):  # keeps `import shardps` free of TensorFlow
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shardps' has no attribute {name!r}")
