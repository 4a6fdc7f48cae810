"""TensorBoard event files for a training run, written by the driver with ``tf.summary``.

``Board(logdir, config)`` opens one run folder per run (``<logdir>/<time>-<mode>-<shards>s``);
``board.write(step, {tag: value})`` adds scalars at a step; ``close()`` flushes. Watch with
``tensorboard --logdir <logdir>`` (the ``tensorboard`` package, a dependency of shardps, is the viewer).
"""
from __future__ import annotations

import math
import time
from pathlib import Path


class Board:
    """One run's TensorBoard writer. Blocks only to append to a local file."""

    def __init__(self, logdir: str, run_name: str):
        import tensorflow as tf

        self._tf = tf
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(logdir) / f"{stamp}-{run_name}"
        for n in range(2, 1000):  # two runs in the same second get their own folders
            if not path.exists():
                break
            path = Path(logdir) / f"{stamp}-{run_name}-{n}"
        self.path = path
        self._writer = tf.summary.create_file_writer(str(path))

    def write(self, step: float, scalars: dict[str, float]) -> None:
        """Record ``scalars`` at ``step`` (rounded to an integer step); NaN values are skipped."""
        with self._writer.as_default():
            for tag, value in scalars.items():
                if value is not None and math.isfinite(value):
                    self._tf.summary.scalar(tag, float(value), step=int(round(step)))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def shard_scalars(stats: list[dict]) -> dict[str, float]:
    """Per shard: bytes held, pushes and pulls served (from ``Router.stats()``)."""
    out = {}
    for s in stats:
        for field in ("bytes", "pushes", "pulls"):
            out[f"shard{s['shard']}/{field}"] = s[field]
    return out
