"""What a run trains on: examples in memory (arrays) or a Ray dataset, split among the workers and batched.

Examples follow Keras's conventions: ``x`` is one array (a one-input model)
or a dict of arrays keyed by the model's input names, ``y`` the labels. A
``ray.data.Dataset`` holds both as columns: ``label`` names the labels, the
other columns are matched to the model's inputs by name.

On the driver, :class:`Examples` and :class:`RayExamples` give the parts of
the workers (:meth:`parts`), the first rows (for checks) and chunks (for
evaluation); in a worker, a part's :meth:`batches` gives mini-batch ``k`` of
an endless stream (epoch after epoch), so a retried step, a replaced worker
or a resumed run reads the same data again.
"""
from __future__ import annotations

import importlib
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np


def as_columns(x):
    """A numpy structured array as a dict of its fields (``ctr``'s ``ids``, ``dense``); anything else as it is."""
    if isinstance(x, np.ndarray) and x.dtype.names:
        return {name: x[name] for name in x.dtype.names}
    return x


def num_rows(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def take(x, index):
    """Rows ``index`` (an index array or a slice) of ``x``, a dict of arrays or an array."""
    return {k: v[index] for k, v in x.items()} if isinstance(x, dict) else x[index]


def _concat(parts: list):
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def worker_split(num_examples: int, num_workers: int, *, seed: int | None = 0) -> list[np.ndarray]:
    """Disjoint index sets, one per worker, covering every example, sizes differing by one at most:
    a permutation drawn from ``seed`` cut in parts, or contiguous ranges in order with ``seed=None``."""
    order = np.arange(num_examples) if seed is None else np.random.default_rng(seed).permutation(num_examples)
    return np.array_split(order, num_workers)


@dataclass
class Examples:
    """Examples in memory. ``shuffle``: workers get random parts, reshuffled every epoch; else contiguous
    parts read in order (what a Ray dataset does)."""

    x: object
    y: np.ndarray
    shuffle: bool = True

    def __post_init__(self):
        self.x, self.y = as_columns(self.x), np.asarray(self.y)
        if isinstance(self.x, dict):
            self.x = {k: np.asarray(v) for k, v in self.x.items()}
            lengths = {k: len(v) for k, v in self.x.items()}
        else:
            self.x = np.asarray(self.x)
            lengths = {"x": len(self.x)}
        if not lengths or set(lengths.values()) != {len(self.y)}:
            raise ValueError(f"inputs and labels must have the same number of rows. Received {lengths} "
                             f"and {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def columns(self) -> list[str] | None:
        return sorted(self.x) if isinstance(self.x, dict) else None

    def head(self, n: int) -> tuple:
        return take(self.x, slice(0, n)), self.y[:n]

    def chunks(self, size: int):
        for start in range(0, len(self), size):
            yield take(self.x, slice(start, start + size)), self.y[start:start + size]

    def materialize(self) -> "Examples":
        """Already in memory: itself (as :meth:`RayExamples.materialize`)."""
        return self

    def parts(self, num_workers: int, seed: int) -> list:
        """One :class:`ArrayPart` per worker (its rows put in Ray's object store); blocks while putting."""
        import ray

        index = worker_split(len(self), num_workers, seed=seed if self.shuffle else None)
        return [ArrayPart([ray.put(take(self.x, i)), ray.put(self.y[i])], self.shuffle) for i in index]


@dataclass
class ArrayPart:
    """A worker's rows: ``refs`` = [ObjectRef of x, of y]. Nested in a list, Ray does not count them as
    actor constructor arguments (it warns about those for restartable actors); the driver keeps them alive."""

    refs: list
    shuffle: bool

    def batches(self, batch_size: int, seed: int):
        import ray

        x, y = ray.get(self.refs)
        return Batches(x, y, batch_size, seed=seed, shuffle=self.shuffle)


def quiet_ray_data(dataset) -> None:
    """No progress bars or start-of-execution lines from Ray Data for ``dataset`` (shardps reports progress).

    A dataset carries its own copy of Ray Data's context (to its workers too).
    """
    context = dataset.context
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


def quiet_ray_data_logs(level: int = logging.ERROR) -> None:
    """Ray Data's own log lines (notices, execution summaries) in this process only from ``level`` up: for
    shardps's own processes (its workers, the CLI), never called in a user's."""
    importlib.import_module("ray.data")  # sets its loggers' levels when imported: ours comes after
    logging.getLogger("ray.data").setLevel(level)


def split_label(batch: dict, label: str) -> tuple[dict, np.ndarray]:
    """A Ray dataset's numpy batch as ``(inputs, labels)``; list columns (object arrays of equal-length
    arrays, as Parquet list columns come) stacked into 2-D arrays."""
    def dense(column: np.ndarray) -> np.ndarray:
        return np.stack(column) if column.dtype == object else column

    inputs = {name: dense(column) for name, column in batch.items() if name != label}
    return inputs, dense(batch[label])


READ_BATCHES = 32  # mini-batches a worker takes from Ray Data at once


@dataclass
class RayExamples:
    """A ``ray.data.Dataset`` of examples; ``label``: the column of the labels."""

    dataset: object
    label: str = "label"

    def __post_init__(self):
        quiet_ray_data(self.dataset)
        names = self.dataset.schema().names
        if self.label not in names:
            raise ValueError(f"the Ray dataset has no label column {self.label!r} (pass label=...); "
                             f"its columns: {names}")
        self._count = None

    def __len__(self) -> int:
        if self._count is None:
            self._count = self.dataset.count()
        return self._count

    def columns(self) -> list[str]:
        return sorted(n for n in self.dataset.schema().names if n != self.label)

    def head(self, n: int) -> tuple:
        return self._split_label(self.dataset.take_batch(n, batch_format="numpy"))

    def _split_label(self, batch: dict) -> tuple:
        return split_label(batch, self.label)

    def chunks(self, size: int):
        for batch in self.dataset.iter_batches(batch_size=size, batch_format="numpy"):
            yield self._split_label(batch)

    def materialize(self) -> "RayExamples":
        """The same examples, computed once into Ray's object store (for data read again every evaluation)."""
        return RayExamples(self.dataset.materialize(), self.label)  # a new dataset: quieted again

    def parts(self, num_workers: int, seed: int) -> list:
        """``num_workers`` equal parts (the last ``len % num_workers`` rows are left out), each a
        materialized dataset in Ray's object store, not on the driver. Blocks while reading."""
        if len(self) < num_workers:
            raise ValueError(f"the Ray dataset has {len(self)} rows: fewer than the {num_workers} workers")
        return [DatasetPart(part, self.label) for part in self.dataset.split(num_workers, equal=True)]


@dataclass
class DatasetPart:
    """A worker's rows of a Ray dataset, read in order, epoch after epoch."""

    dataset: object
    label: str

    def batches(self, batch_size: int, seed: int):
        quiet_ray_data_logs()  # in the worker
        return StreamBatches(self.dataset, self.label, batch_size)


class Batches:
    """Endless mini-batches over ``(x, y)``, deterministic by seed; reshuffled every epoch if ``shuffle``.

    Random access: ``batch(k)`` is the k-th mini-batch of the stream, so a
    restarted worker, a retried step or a resumed run picks up exactly the
    data an undisturbed run would use. Epoch ``e`` is the permutation drawn
    from ``(seed, e)`` (or the rows in order); batches run on across epoch
    ends, never dry.
    """

    def __init__(self, x, y: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if len(y) == 0:
            raise ValueError("a worker got no training examples: use fewer workers")
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self._seed = seed
        self._perms: dict[int, np.ndarray] = {}  # the last epochs' permutations
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        self._next += 1
        return self.batch(self._next - 1)

    def batch(self, k: int) -> tuple:
        """Mini-batch number ``k`` (from 0) of the stream."""
        n = len(self.y)
        positions = np.arange(k * self.batch_size, (k + 1) * self.batch_size)
        epochs = positions // n
        idx = positions % n
        if self.shuffle:
            for epoch in np.unique(epochs):
                here = epochs == epoch
                idx[here] = self._permutation(int(epoch))[idx[here]]
        return take(self.x, idx), self.y[idx]

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self._seed, epoch]).permutation(len(self.y))
        return self._perms[epoch]


class StreamBatches:
    """Mini-batches of a Ray dataset read in order, epoch after epoch (a batch may span an epoch's end).

    ``batch(k)`` as :class:`Batches`: the last batch is kept (a retried step
    reads it again), a later one is read forward, an earlier one re-reads
    the stream from the start (a replaced worker starts there).
    """

    def __init__(self, dataset, label: str, batch_size: int):
        quiet_ray_data(dataset)
        self._dataset, self._label, self.batch_size = dataset, label, batch_size
        self._stream = None
        self._next = 0
        self._last: tuple | None = None  # (k, batch)

    def batch(self, k: int) -> tuple:
        if self._last is not None and self._last[0] == k:
            return self._last[1]
        if self._stream is None or k < self._next:
            self.close()
            self._stream, self._next = self._read(), 0
        while self._next <= k:
            found = next(self._stream)
            self._next += 1
        self._last = (k, found)
        return found

    def close(self) -> None:
        """Stop reading (the Ray Data iterator is closed now, not whenever it is garbage-collected)."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _read(self):
        """The endless stream of mini-batches: consecutive ``batch_size`` rows of the dataset, epoch after
        epoch. Ray Data hands over chunks of many batches (its per-batch conversion costs more than a slice)."""
        x, y, at = None, np.empty(0), 0  # rows read and not yet handed out: from `at` on
        for _ in itertools.count():
            empty = True
            for chunk in self._dataset.iter_batches(batch_size=self.batch_size * READ_BATCHES, batch_format="numpy",
                                                    prefetch_batches=0):
                chunk_x, chunk_y = split_label(chunk, self._label)
                empty = empty and len(chunk_y) == 0
                if at < len(y):  # a few rows left over: they come first
                    chunk_x, chunk_y = _concat([take(x, slice(at, None)), chunk_x]), np.concatenate([y[at:], chunk_y])
                x, y, at = chunk_x, chunk_y, 0
                while len(y) - at >= self.batch_size:
                    yield take(x, slice(at, at + self.batch_size)), y[at:at + self.batch_size]
                    at += self.batch_size
            if empty:
                raise ValueError("a worker got no training examples: use fewer workers")


@dataclass
class RunData:
    """A run's examples: ``train`` and ``validation`` (None: no evaluation), each :class:`Examples` or
    :class:`RayExamples`; ``name`` and ``reference`` (best achievable metrics) go into the History."""

    train: object
    validation: object = None
    name: str = "custom"
    reference: dict = field(default_factory=dict)
