"""shardps: a sharded parameter server on Ray.

Importing shardps starts nothing and imports neither Ray nor TensorFlow:
Ray starts in :func:`launch`, TensorFlow loads with the training API.
"""
import importlib

__all__ = [
    "launch", "restore", "Router", "Handle", "HashPartitioner", "ParameterShard",
    "SGD", "Momentum", "Adam", "Adagrad", "FTRL", "Zeros", "Uniform", "Normal", "ShardUnavailableError",
    "train", "TrainConfig", "History",
]

_HOME = {
    "launch": "shardps.cluster", "restore": "shardps.cluster", "Router": "shardps.router",
    "Handle": "shardps.handle", "HashPartitioner": "shardps.partition", "ParameterShard": "shardps.shard",
    "SGD": "shardps.optim", "Momentum": "shardps.optim", "Adam": "shardps.optim", "Adagrad": "shardps.optim", "FTRL": "shardps.optim",
    "Zeros": "shardps.table", "Uniform": "shardps.table", "Normal": "shardps.table",
    "ShardUnavailableError": "shardps.errors", "train": "shardps.trainers", "TrainConfig": "shardps.config",
    "History": "shardps.trainers",
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'shardps' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
