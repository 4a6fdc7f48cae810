"""Criteo-format click logs: parsing against hand-computed values, the documented id formula, malformed
lines, and training on such a file in each mode."""
import functools
import gzip
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from shardps.training import criteo
from shardps.training.config import TrainConfig

MISSING, HASHED = 2**61, 2**62


def line(label="1", ints=None, cats=None) -> str:
    ints = ints if ints is not None else ["1"] * 13
    cats = cats if cats is not None else ["68fd1e64"] * 26
    return "\t".join([label, *ints, *cats]) + "\n"


def test_values_parse_as_documented(tmp_path):
    ints = ["5", "", "-3", "0", "1", "100", "", "", "", "", "", "", "7"]
    cats = ["68fd1e64", "", "hello", "ABCDEF01", *[""] * 21, "80e26c9b"]
    path = tmp_path / "day_0"
    path.write_text(line("0", ints, cats) + line())
    got = criteo.read(path)
    assert got.skipped == 0 and got.label.tolist() == [0.0, 1.0]
    want_dense = np.log1p(np.array([5, 0, 0, 0, 1, 100, 0, 0, 0, 0, 0, 0, 7], np.float64)).astype(np.float32)
    np.testing.assert_array_equal(got.dense[0], want_dense)  # log(1 + x) for x > 0; 0, negative, missing -> 0
    np.testing.assert_array_equal(got.dense[1], np.full(13, np.log1p(1), np.float32))
    ids = got.ids[0]
    assert ids[0] == 0x68FD1E64  # field 0: (0 << 32) | value
    assert ids[1] == MISSING + 1
    assert ids[2] == HASHED | (xxhash.xxh64_intdigest(b"hello", seed=2) & (HASHED - 1))
    assert ids[3] == (3 << 32) | 0xABCDEF01  # either case
    assert ids[4] == MISSING + 4
    assert ids[25] == (25 << 32) | 0x80E26C9B
    assert got.ids[1].tolist() == [(f << 32) | 0x68FD1E64 for f in range(26)]


def test_ids_of_one_field_never_collide_and_fields_stay_apart():
    values = [f"{v:08x}" for v in (0, 1, 2**32 - 1, 0xDEADBEEF)]
    ids = np.stack([criteo.categorical_ids(values, f) for f in range(26)])
    assert len(np.unique(ids)) == ids.size
    assert ids[0].tolist() == [0, 1, 2**32 - 1, 0xDEADBEEF]


def test_ids_of_a_sliced_or_chunked_arrow_column_match_those_of_its_values():
    import pyarrow as pa

    values = ["68fd1e64", "", "x", None, "00000001", "ffffffff"]
    want = criteo.categorical_ids(values[2:], 5)
    np.testing.assert_array_equal(criteo.categorical_ids(pa.array(values)[2:], 5), want)
    np.testing.assert_array_equal(criteo.categorical_ids(pa.chunked_array([values[2:4], values[4:]]), 5), want)
    np.testing.assert_array_equal(criteo.categorical_ids(np.array(values[2:], dtype=object), 5), want)


def test_ids_are_the_same_in_another_process():
    values = ["68fd1e64", "", None, "not hex", "é", "0000000g"]
    here = criteo.categorical_ids(values, 7).tolist()
    code = (f"from shardps.training.criteo import categorical_ids; "
            f"print(categorical_ids({values!r}, 7).tolist())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(there) == here
    assert here[1] == here[2] == MISSING + 7 and here[3] >= HASHED and here[5] >= HASHED  # 'g' is no hex digit


def test_gzip_plain_glob_and_folder_read_the_same(tmp_path):
    rng = np.random.default_rng(0)
    lines = [line(str(rng.integers(2)), [str(v) for v in rng.integers(-2, 50, 13)],
                  [f"{v:08x}" for v in rng.integers(0, 2**32, 26)]) for _ in range(50)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("".join(lines[:20]))
    with gzip.open(tmp_path / "data" / "b.txt.gz", "wt") as f:
        f.write("".join(lines[20:]))
    (tmp_path / "all.txt").write_text("".join(lines))
    whole = criteo.read(tmp_path / "all.txt")
    for path in (tmp_path / "data", tmp_path / "data" / "*.txt*"):
        got = criteo.read(path)
        for a, b in zip(got[:3], whole[:3]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, why", [
    (line().replace("\t", "", 1), "expected 40 tab-separated fields, found 39"),
    (line(label="2"), "the label must be 0 or 1"),
    (line(ints=["1", "x7", *["1"] * 11]), "integer feature 2 is not an integer"),
])
def test_a_malformed_line_is_named_by_file_and_line_or_skipped_and_counted(tmp_path, bad, why):
    path = tmp_path / "day_1.gz"
    with gzip.open(path, "wt") as f:
        f.write(line() + line("0") + bad + line())
    with pytest.raises(ValueError, match=f"day_1.gz:3: {why}"):
        criteo.read(path)
    got = criteo.read(path, skip_malformed=True)
    assert got.skipped == 1 and got.label.tolist() == [1.0, 0.0, 1.0]


def test_empty_missing_and_fileless_paths_get_clear_errors(tmp_path):
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        criteo.read(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no Criteo file"):
        criteo.read(tmp_path / "nope")
    (tmp_path / "broken.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken.gz: unreadable"):
        criteo.read(tmp_path / "broken.gz")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        criteo.read(tmp_path / "folder")
    with pytest.raises(ValueError, match="no files match"):
        criteo.read(tmp_path / "*.csv")


@pytest.mark.parametrize("fields, match", [
    ({"dataset": "digits", "data_dir": "/tmp"}, "`data_dir` is read by datasets"),
    ({"model": "widedeep", "data_dir": "/tmp"}, "`data_dir` is read by datasets"),  # ctr: synthetic
    ({"model": "widedeep", "dataset": "criteo"}, "`data_dir` must name the Criteo file"),
    ({"model": "widedeep", "dataset": "ctr", "test_data": "x"}, "`test_data`"),
    ({"dataset": "criteo", "data_dir": "x"}, "Model 'widedeep' trains on click logs"),
])
def test_data_dir_is_never_silently_ignored(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def test_auto_with_a_data_dir_reads_mnist_there_or_says_it_is_missing(tmp_path):
    from shardps.training import data

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.load("auto", data_dir=str(tmp_path))  # not digits instead


def _click_log(path, rows: int, seed: int = 0) -> None:
    """A learnable Criteo-format file: the label follows the first two categorical fields."""
    rng = np.random.default_rng(seed)
    f0, f1 = rng.integers(0, 40, rows), rng.integers(0, 40, rows)
    label = ((f0 + f1) % 3 == 0).astype(int)
    with open(path, "w") as f:
        for i in range(rows):
            ints = [str(v) for v in rng.integers(0, 20, 13)]
            cats = [f"{f0[i]:08x}", f"{f1[i]:08x}", *(f"{v:08x}" for v in rng.integers(0, 5, 24))]
            f.write(line(str(label[i]), ints, cats))


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_each_mode_trains_on_a_criteo_file_and_every_id_gets_its_rows(ray_session, tmp_path, mode):
    from shardps.training.run import train

    path = tmp_path / "clicks.txt"
    _click_log(path, 1200)
    config = TrainConfig(model="widedeep", dataset="criteo", data_dir=str(path), test_rows=200, mode=mode,
                         num_shards=2, batch_size=64, epochs=1, embedding_dim=4, eval_every=1000)
    history = train(config)
    train_ids = criteo.read(path).ids[:-200]
    distinct = sum(len(np.unique(train_ids[:, f])) for f in range(26))
    assert history.dataset == "criteo" and history.steps == config.steps_for(1000)
    assert history.summary()["table_rows"] == 2 * distinct  # emb and wide: one row per id trained on, in each
    assert np.isfinite(history.points[-1].metrics["logloss"])


def _as_arrays(ds) -> tuple:
    rows = ds.to_pandas()
    return (np.stack(rows["label"]).astype(np.float32), np.stack(rows["dense"]), np.stack(rows["ids"]))


def test_the_ray_dataset_streams_what_read_reads_gzip_and_plain(ray_session, tmp_path):
    rng = np.random.default_rng(1)
    lines = [line(str(rng.integers(2)), [str(v) if v % 5 else "" for v in rng.integers(-2, 50, 13)],
                  [f"{v:08x}" if v % 7 else "" for v in rng.integers(0, 2**32, 26)]) for _ in range(3000)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("".join(lines[:1000]))
    with gzip.open(tmp_path / "data" / "b.txt.gz", "wt") as f:
        f.write("".join(lines[1000:]))
    want = criteo.read(tmp_path / "data")
    got = _as_arrays(criteo.dataset(tmp_path / "data"))
    for a, b in zip(got, want[:3]):  # in file order
        np.testing.assert_array_equal(a, b)


def test_the_ray_dataset_names_a_malformed_line_or_skips_it(ray_session, tmp_path):
    path = tmp_path / "day_2.gz"
    with gzip.open(path, "wt") as f:
        f.write(line() + line("0") + line().replace("\t", "", 1) + line(label="2") + line())
    with pytest.raises(ValueError, match="^[^ ]*day_2.gz:3: expected 40 tab-separated fields, found 39$"):
        criteo.materialized(criteo.dataset(path))
    assert _as_arrays(criteo.dataset(path, skip_malformed=True))[0].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(FileNotFoundError):
        criteo.dataset(tmp_path / "nope")


def test_fit_trains_on_the_ray_dataset_of_a_criteo_file(ray_session, tmp_path):
    import shardps
    from shardps.training.models.builtin import widedeep

    path = tmp_path / "clicks.txt"
    _click_log(path, 1200)
    history = shardps.fit(functools.partial(widedeep, 26, 13, embedding_dim=4), criteo.dataset(path),
                          label="label", validation_data=criteo.dataset(path), batch_size=64, mode="async")
    assert history.steps == 1200 // 2 // 64 + 1 and np.isfinite(history.history["val_loss"][-1])
    assert history.history["val_auc"][-1] > 0.6


@pytest.mark.slow  # Ray and TensorFlow in a subprocess
def test_the_cli_names_a_malformed_line_and_says_nothing_else(tmp_path):
    path = tmp_path / "day_3.gz"
    with gzip.open(path, "wt") as f:
        f.write(line() * 50 + line(ints=["1", "x7", *["1"] * 11]) + line() * 50)
    out = subprocess.run([sys.executable, "-m", "shardps.cli", "train", "--model", "widedeep", "--dataset", "criteo",
                          "--data-dir", str(path), "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip() == f"shardps: error: {path}:51: integer feature 2 is not an integer: b'x7'"
