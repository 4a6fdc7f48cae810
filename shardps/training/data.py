"""Datasets: MNIST from local files, scikit-learn's digits (offline default), synthetic, ctr.

Images are float32 NHWC in [0, 1]; labels are int64 class ids. ``ctr``
(see :mod:`shardps.training.ctr`) holds click examples as a structured array
(``ids``, ``dense``) with float32 0/1 labels.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DATASETS = ("auto", "mnist", "digits", "synthetic", "ctr", "criteo")
FILE_DATASETS = ("auto", "mnist", "criteo")  # the datasets that read data_dir
CLICK_DATASETS = ("ctr", "criteo")  # click logs: (ids, dense) examples for widedeep
_IDX = {  # MNIST's four standard files
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A train/test split of examples and labels; ``reference``: best achievable test metrics, if known."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    reference: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's shape; for structured examples (ctr) the widths of its fields: (ids, dense)."""
        if self.x_train.dtype.names:
            return tuple(int(np.prod(self.x_train.dtype[name].shape)) for name in self.x_train.dtype.names)
        return tuple(self.x_train.shape[1:])


def load(name: str = "auto", *, data_dir: str | None = None, download: bool = False, seed: int = 0) -> Dataset:
    """Load a dataset held in memory by name (see :data:`DATASETS`; ``criteo``: :func:`criteo_data`).

    ``auto`` is MNIST when its files are found locally, else digits; with a
    ``data_dir`` it is MNIST from there (a folder given and not used would be
    ignored silently).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: ``mnist`` files missing (the message lists every path tried).
    """
    if name == "auto" and data_dir is not None:
        return load_mnist(data_dir, download=download)
    if name == "auto":
        try:
            data = load_mnist(data_dir)
        except FileNotFoundError:
            log.info("MNIST not found locally: using scikit-learn's digits")
            return load_digits(seed=seed)
        log.info("using MNIST found locally")
        return data
    if name == "mnist":
        return load_mnist(data_dir, download=download)
    if name == "digits":
        return load_digits(seed=seed)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "ctr":
        from shardps.training import ctr

        *arrays, reference = ctr.generate(seed=seed)
        return Dataset("ctr", *arrays, 2, reference)
    raise ValueError(f"Unknown dataset {name!r}; expected one of {DATASETS}")


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 bundled 8x8 handwritten digits, split train/test by ``seed``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def synthetic(*, num_train: int = 4096, num_test: int = 512, shape=(28, 28, 1), num_classes: int = 10,
              seed: int = 0) -> Dataset:
    """Random images whose label is decided by a fixed random linear map (learnable, for benchmarks)."""
    rng = np.random.default_rng(seed)
    x = rng.random((num_train + num_test, *shape), dtype=np.float32)
    proj = rng.standard_normal((int(np.prod(shape)), num_classes)).astype(np.float32)
    y = np.argmax(x.reshape(len(x), -1) @ proj, axis=1).astype(np.int64)
    return Dataset("synthetic", x[:num_train], y[:num_train], x[num_train:], y[num_train:], num_classes)


def mnist_candidates(data_dir: str | None) -> list[Path]:
    """Folders searched for MNIST, in order: ``data_dir``, then the Keras cache."""
    keras_home = Path(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras"))) / "datasets"
    return [Path(p) for p in ([data_dir] if data_dir else [])] + [keras_home]


def load_mnist(data_dir: str | None = None, *, download: bool = False) -> Dataset:
    """MNIST from the four IDX files (gzipped or not) or Keras' ``mnist.npz``.

    Looks in ``data_dir`` and then the Keras cache. Downloads (through Keras)
    only when ``download`` is true.

    Raises:
        FileNotFoundError: nothing found; the message names every path tried.
        ValueError: a file is not a valid IDX file.
    """
    tried = []
    for folder in mnist_candidates(data_dir):
        npz = folder / "mnist.npz"
        tried.append(str(npz))
        if npz.is_file():
            with np.load(npz, allow_pickle=False) as f:
                return _mnist(f["x_train"], f["y_train"], f["x_test"], f["y_test"])
        arrays = {}
        for part, stem in _IDX.items():
            found = [folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()]
            tried.extend(str(folder / (stem + ext)) for ext in ("", ".gz"))
            if found:
                arrays[part] = read_idx(found[0])
        if len(arrays) == 4:
            return _mnist(**arrays)
    if download:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return _mnist(x_train, y_train, x_test, y_test)
    raise FileNotFoundError("MNIST not found (pass --download to fetch it); looked for: " + ", ".join(tried))


def _mnist(x_train, y_train, x_test, y_test) -> Dataset:
    def images(x):
        return (np.asarray(x, np.float32) / 255.0)[..., None]

    return Dataset("mnist", images(x_train), np.asarray(y_train, np.int64), images(x_test),
                   np.asarray(y_test, np.int64), 10)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not. Raises ``ValueError`` if malformed."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) != header + int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: size does not match its header dimensions {dims}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def criteo_data(path: str, *, test_data: str | None = None, test_rows: int | None = None,
                skip_malformed: bool = False):
    """Criteo-format click logs (:mod:`shardps.training.criteo`) as a run's data, through Ray Data.

    Ray Data tasks read and parse the files (each streamed, never whole in
    one process) into Ray's object store, which spills to disk what does
    not fit in it; the workers read their parts from there. The test set is
    ``test_data`` if given, else the last ``test_rows`` rows (default: the
    last 10 %, at least one). Needs Ray running. Raises ``FileNotFoundError``
    / ``ValueError`` as :func:`criteo.files` does, ``ValueError`` naming the
    file and line of a malformed line (unless ``skip_malformed``), and
    ``ValueError`` when nothing is left to train on.
    """
    from shardps.training import criteo
    from shardps.training.feed import RayExamples, RunData

    examples = criteo.materialized(criteo.dataset(path, skip_malformed=skip_malformed))
    if test_data is not None:
        test = criteo.materialized(criteo.dataset(test_data, skip_malformed=skip_malformed))
    else:
        total = examples.count()
        held = test_rows if test_rows is not None else max(1, total // 10)
        if held >= total:
            raise ValueError(f"{path}: {total} examples leave none to train on after holding out {held}")
        examples, test = examples.split_at_indices([total - held])
    return RunData(RayExamples(examples, "label"), RayExamples(test, "label"), "criteo")
