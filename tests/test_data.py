"""Datasets: the MNIST loader on files the test writes, digits, splits and batches."""
import gzip

import numpy as np
import pytest

from shardps.training import data, feed


def write_idx(path, array, compress):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def tiny_mnist():
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), "y_train": rng.integers(0, 10, 20, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), "y_test": rng.integers(0, 10, 5, dtype=np.uint8),
    }


def check_loaded(ds, arrays):
    assert ds.name == "mnist" and ds.input_shape == (28, 28, 1)
    np.testing.assert_allclose(ds.x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_loader_reads_idx_files(tmp_path, tiny_mnist, compress):
    for part, stem in data._IDX.items():
        write_idx(tmp_path / (stem + (".gz" if compress else "")), tiny_mnist[part], compress)
    check_loaded(data.load_mnist(str(tmp_path)), tiny_mnist)


def test_mnist_loader_reads_keras_npz(tmp_path, tiny_mnist):
    np.savez(tmp_path / "mnist.npz", **tiny_mnist)
    check_loaded(data.load_mnist(str(tmp_path)), tiny_mnist)


def test_missing_mnist_names_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(FileNotFoundError) as err:
        data.load_mnist(str(tmp_path / "nowhere"))
    message = str(err.value)
    for stem in list(data._IDX.values()) + ["mnist.npz"]:
        assert str(tmp_path / "nowhere" / stem) in message and str(tmp_path / "keras" / "datasets" / stem) in message


def test_auto_falls_back_to_digits_without_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = data.load("auto")
    assert ds.name == "digits" and len(ds.x_train) + len(ds.x_test) == 1797
    with pytest.raises(FileNotFoundError):  # a data_dir given is read, never ignored
        data.load("auto", data_dir=str(tmp_path))


def test_auto_prefers_local_mnist(tmp_path, tiny_mnist):
    np.savez(tmp_path / "mnist.npz", **tiny_mnist)
    assert data.load("auto", data_dir=str(tmp_path)).name == "mnist"


def test_corrupt_idx_file_rejected(tmp_path, tiny_mnist):
    path = tmp_path / "bad-idx"
    write_idx(path, tiny_mnist["x_test"], compress=False)
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="size"):
        data.read_idx(path)
    path.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(path)


def test_worker_split_is_disjoint_complete_and_deterministic():
    parts = feed.worker_split(103, 4, seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert all(np.array_equal(a, b) for a, b in zip(parts, feed.worker_split(103, 4, seed=3)))


def test_batches_wrap_around_epochs_without_running_dry():
    x, y = np.arange(10.0), np.arange(10)
    batches = feed.Batches(x, y, 4, seed=0)
    seen = np.concatenate([next(batches)[1] for _ in range(5)])  # 20 = two epochs
    assert sorted(seen.tolist()) == sorted(list(range(10)) * 2)


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match="imagenet"):
        data.load("imagenet")


def test_batches_random_access_matches_the_stream():
    x, y = np.arange(10.0), np.arange(10)
    stream = feed.Batches(x, y, 4, seed=3)
    seen = [next(stream)[1] for _ in range(8)]  # 32 examples: into the fourth epoch
    fresh = feed.Batches(x, y, 4, seed=3)  # e.g. a restarted worker: jumps straight to any batch
    for k in (6, 0, 7, 2):
        np.testing.assert_array_equal(fresh.batch(k)[1], seen[k])
    flat = np.concatenate(seen)
    for epoch in range(3):  # each epoch is a permutation of the data
        assert sorted(flat[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:20])  # reshuffled


@pytest.mark.parametrize("read_batches", [1, 32])
def test_stream_batches_of_a_ray_dataset_are_consecutive_rows_epoch_after_epoch(ray_session, monkeypatch,
                                                                                read_batches):
    import ray.data

    monkeypatch.setattr(feed, "READ_BATCHES", read_batches)
    rows = np.arange(10)
    ds = ray.data.from_items([{"x": [float(i), -float(i)], "label": i} for i in rows], override_num_blocks=3)
    stream = feed.StreamBatches(ds, "label", batch_size=4)
    try:
        for k in [0, 1, 2, 3, 4, 4, 1, 5]:  # forward, again (a retried step), back (a replaced worker)
            x, y = stream.batch(k)
            want = rows[np.arange(4 * k, 4 * k + 4) % 10]
            np.testing.assert_array_equal(y, want)
            np.testing.assert_array_equal(x["x"], np.stack([want, -want], axis=1).astype(float))
    finally:
        stream.close()
