"""TrainConfig: everything one training run needs, checked once."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Callable

from shardps.training.data import CLICK_DATASETS, DATASETS, FILE_DATASETS
from shardps.training.models import MODELS, load_function
from shardps.store.shard.recovery import replication_restarts
from shardps.store.optim import OPTIMIZERS, optimizer_config
from shardps.store.placement import DEFAULT_BLOCK_BYTES, check_resources
from shardps.store.tables import MAX_MIN_COUNT

MODES = ("sync", "async", "ssp")
MODEL_DEFAULTS = {  # batch_size, lr and optimizer when not given
    "cnn": {"batch_size": 32, "lr": 0.05, "optimizer": "sgd"},  # small batches learn digits fast
    "mlp": {"batch_size": 32, "lr": 0.05, "optimizer": "sgd"},
    "widedeep": {"batch_size": 256, "lr": 0.002, "optimizer": "adam"},  # and one epoch: one pass over click logs
}
USER_MODEL_DEFAULTS = {"batch_size": 32, "lr": 0.001, "optimizer": "adam"}  # Keras's fit batch, Adam's usual rate


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Invalid values raise ``ValueError`` naming the field.

    ``steps`` counts steps per worker (one mini-batch each), so every mode
    sees the same number of examples: ``steps * num_workers * batch_size``.
    """

    mode: str = "sync"  # the original example's synchronous server
    num_shards: int = 1  # the single-actor baseline
    num_workers: int = 2  # one per core here
    steps: int | None = None  # per worker; None: from `epochs`, else 300 (widedeep: one epoch)
    epochs: float | None = None  # passes over each worker's part of the data
    batch_size: int | None = None  # None: the model's default (MODEL_DEFAULTS)
    lr: float | None = None  # per-worker rate (None: the model's); sync scales it by num_workers
    optimizer: object = None  # server-side rule for dense keys: a name or an instance (shardps.Adam(1e-3)); None: the model's
    model: str | Callable = "cnn"  # a built-in (MODELS), "module:function", or a model function
    dataset: str = "auto"  # MNIST if found locally, else digits; ctr for widedeep
    data_dir: str | None = None  # where to look for MNIST first; criteo: its file(s)
    test_data: str | None = None  # criteo: a held-out file; None: the last test_rows rows
    test_rows: int | None = None  # criteo: rows held out at the end; None: 10 %
    skip_malformed: bool = False  # criteo: leave malformed lines out (counted) instead of failing
    download: bool = False  # never touch the network unless asked
    staleness: int | None = None  # ssp only: max steps a worker may lead (default 2)
    scale_lr: bool = True  # sync: lr * num_workers, as the original example does
    max_inflight: int = 2  # async/ssp: unacknowledged pushes per worker
    prefetch: bool = True  # async: send the next step's pull before computing this step's gradient
    address: str | None = None  # Ray cluster to join; None: local (or RAY_ADDRESS)
    num_cpus: int | None = None  # CPUs of a locally started Ray; None: all
    shard_resources: dict | None = None  # Ray resources each shard needs, e.g. {"ps": 0.01}: shards on those nodes
    worker_resources: dict | None = None  # the same for each worker, e.g. {"trainer": 0.01}
    block_bytes: int = DEFAULT_BLOCK_BYTES  # tensor split size for sharding
    seed: int = 0  # data split, batches and initial weights
    eval_every: int | None = 50  # steps (per worker) between evaluations; None: once per epoch
    checkpoint_dir: str | None = None  # where checkpoints go; None: no checkpoints
    checkpoint_every: int | None = None  # steps between checkpoints; None: only at the end
    resume: bool = False  # start from the latest checkpoint in checkpoint_dir, if any
    max_restarts: int = 3  # per worker (and per shard, with checkpoint_dir or replicas) before the run fails
    replicas: int = 1  # 2: every shard mirrored on a replica actor, so a shard crash loses nothing
    logdir: str | None = None  # TensorBoard event files go to a new run folder under it; None: none
    table_optimizer: str = "adagrad"  # embedding tables (widedeep): per-row rule
    table_lr: float = 0.05  # its learning rate
    embedding_dim: int = 16  # width of the rows of widedeep's emb table
    min_count: int = 1  # pushes an id needs before it gets a row
    max_rows: int | None = None  # rows per table at most (least recently updated evicted); None: no limit

    def __post_init__(self):
        self._check_data()
        for name, value in MODEL_DEFAULTS.get(self.model, USER_MODEL_DEFAULTS).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _choice("mode", self.mode, MODES)
        if isinstance(self.optimizer, str):
            _choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        else:
            optimizer_config(self.optimizer)  # an instance shardps knows, else ValueError
        _choice("table_optimizer", self.table_optimizer, ("adagrad", "adam", "ftrl", "sgd"))
        for name in ("embedding_dim", "min_count"):
            _positive_int(name, getattr(self, name))
        if self.max_rows is not None:
            _positive_int("max_rows", self.max_rows)
            if self.max_rows < self.num_shards:  # each shard keeps max_rows // num_shards
                raise ValueError(f"Argument `max_rows` must be at least `num_shards` ({self.num_shards}): each shard "
                                 f"keeps max_rows // num_shards rows. Received: {self.max_rows}")
        if self.min_count > MAX_MIN_COUNT:
            raise ValueError(f"Argument `min_count` must be at most {MAX_MIN_COUNT}. Received: {self.min_count}")
        if not (isinstance(self.table_lr, (int, float)) and math.isfinite(self.table_lr) and self.table_lr > 0):
            raise ValueError(f"Argument `table_lr` must be a positive number. Received: {self.table_lr!r}")
        for name in ("num_shards", "num_workers", "batch_size", "max_inflight", "block_bytes"):
            _positive_int(name, getattr(self, name))
        if self.eval_every is not None:
            _positive_int("eval_every", self.eval_every)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.epochs is not None and not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs)
                                            and self.epochs > 0):
            raise ValueError(f"Argument `epochs` must be a positive finite number. Received: {self.epochs!r}")
        if self.num_cpus is not None:
            _positive_int("num_cpus", self.num_cpus)
        for name in ("shard_resources", "worker_resources"):
            check_resources(name, getattr(self, name))
        for name in ("checkpoint_dir", "logdir"):
            path = getattr(self, name)
            if path is not None and os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"Argument `{name}` must be a folder. Received a file: {path!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("Give `steps` or `epochs`, not both")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Argument `lr` must be a positive number. Received: {self.lr!r}")
        replication_restarts(self.replicas, self.max_restarts)
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
        if (self.checkpoint_every is not None or self.resume) and not self.checkpoint_dir:
            raise ValueError("Argument `checkpoint_dir` is needed by checkpoint_every and resume")
        if self.staleness is not None:
            if self.mode != "ssp":
                raise ValueError(f"Argument `staleness` applies only to mode 'ssp'. Received mode {self.mode!r}")
            if not isinstance(self.staleness, int) or self.staleness < 0:
                raise ValueError(f"Argument `staleness` must be an integer >= 0. Received: {self.staleness!r}")

    def _check_data(self) -> None:
        """The model, the dataset and the files it reads fit together (widedeep on click logs only)."""
        if not callable(self.model) and self.model not in MODELS:
            if not isinstance(self.model, str) or ":" not in self.model:
                raise ValueError(f"Argument `model` must be one of {MODELS}, 'module:function' or a model function. "
                                 f"Received: {self.model!r:.80}")
            load_function(self.model)  # importable, else ValueError
        _choice("dataset", self.dataset, DATASETS)
        if self.model == "widedeep" and self.dataset == "auto":
            object.__setattr__(self, "dataset", "ctr")
        if self.model in MODELS and (self.model == "widedeep") != (self.dataset in CLICK_DATASETS):
            raise ValueError(f"Model 'widedeep' trains on click logs ({', '.join(CLICK_DATASETS)}), and they need "
                             f"model 'widedeep'. Received model {self.model!r}, dataset {self.dataset!r}")
        if self.data_dir is not None and self.dataset not in FILE_DATASETS:
            raise ValueError(f"Argument `data_dir` is read by datasets {FILE_DATASETS} only, not {self.dataset!r}. "
                             f"Received: {self.data_dir!r}")
        if self.dataset == "criteo" and self.data_dir is None:
            raise ValueError("Argument `data_dir` must name the Criteo file(s) (a file, a glob or a folder)")
        if self.test_data is not None and self.dataset != "criteo":
            raise ValueError(f"Argument `test_data` is read by dataset 'criteo' only. Received: {self.test_data!r}")
        if self.test_rows is not None:
            _positive_int("test_rows", self.test_rows)

    @property
    def bound(self) -> int | None:
        """The staleness bound in force: K for ssp, None (unbounded) otherwise."""
        if self.mode != "ssp":
            return None
        return 2 if self.staleness is None else self.staleness

    def steps_for(self, num_train: int) -> int:
        """Steps per worker: ``steps``, or enough for ``epochs`` over a worker's share; when neither is
        given, 300 for ``cnn`` and ``mlp``, one epoch for the others."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else None if self.model in ("cnn", "mlp") else 1.0
        if epochs is not None:
            return max(1, math.ceil(epochs * math.ceil(num_train / self.num_workers) / self.batch_size))
        return 300

    def steps_per_epoch(self, num_train: int) -> int:
        """Steps (per worker) of one pass over a worker's share of ``num_train`` examples."""
        return max(1, math.ceil(math.ceil(num_train / self.num_workers) / self.batch_size))

    def dense_optimizer(self):
        """The dense keys' optimizer instance, its rate scaled by ``num_workers`` in sync runs with ``scale_lr``.

        A named optimizer gets ``lr``; an instance keeps its own rate.
        """
        opt = OPTIMIZERS[self.optimizer](lr=self.lr) if isinstance(self.optimizer, str) else self.optimizer
        if self.mode == "sync" and self.scale_lr:
            opt = replace(opt, lr=opt.lr * self.num_workers)
        return opt

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_folders(config: TrainConfig) -> None:
    """Create ``checkpoint_dir`` and ``logdir`` (if given and missing) and check that files can be written in
    them, so a bad folder fails before anything starts. Raises ``ValueError`` naming the argument."""
    for name in ("checkpoint_dir", "logdir"):
        path = getattr(config, name)
        if path is None:
            continue
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise ValueError(f"Argument `{name}` must be a folder shardps can create and write. "
                             f"Received: {path!r} ({exc.strerror or exc})") from None


def _choice(name, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"Argument `{name}` must be one of {allowed}. Received: {value!r}")


def _positive_int(name, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Argument `{name}` must be an integer >= 1. Received: {value!r}")
