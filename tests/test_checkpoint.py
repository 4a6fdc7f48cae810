"""Checkpoints: exact round trip, re-sharding, atomic saves, clear errors on bad files."""
import json
import os
import warnings

import numpy as np
import pytest
import ray

import shardps
from shardps import Adam
from shardps.store import checkpoint
from shardps.store.shard.actor import ParameterShard
from tests.conftest import kill_and_wait

SHAPES = {"w": (300, 70), "b": (70,), "emb": (2000, 16)}


def trained_store(make_ps, num_shards, steps=3):
    """A store with Adam state after ``steps`` pushes (one partial), and the gradients used."""
    ps = make_ps(num_shards, optimizer=Adam(lr=0.01), block_bytes=4096)
    rng = np.random.default_rng(0)
    ps.register({k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()})
    for step in range(steps):
        keys = SHAPES if step != 1 else ["w"]  # uneven Adam step counts per key
        ps.push({k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in keys})
    return ps


def assert_same_store(a, b):
    """Same values now, and the same values after the same further push (so optimizer state matches too)."""
    grads = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    for pulled_a, pulled_b in [(a.pull(), b.pull()), (a.push_pull(grads), b.push_pull(grads))]:
        for key in SHAPES:
            np.testing.assert_array_equal(pulled_a[key], pulled_b[key], err_msg=key)


@pytest.mark.parametrize("restore_shards", [None, 1, 4])
def test_restore_gives_identical_values_and_optimizer_state(make_ps, tmp_path, restore_shards):
    ps = trained_store(make_ps, 2)
    folder = ps.save(tmp_path, step=3)
    restored = shardps.restore(tmp_path, num_shards=restore_shards)
    try:
        assert restored.num_shards == (restore_shards or 2)
        assert checkpoint.read(folder)[0]["step"] == 3
        assert_same_store(ps, restored)
    finally:
        restored.shutdown()


def test_files_are_npz_without_pickle_and_json(make_ps, tmp_path):
    folder = trained_store(make_ps, 2).save(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["arrays.npz", "manifest.json"]
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        assert all(npz[name].dtype == np.float32 for name in npz.files)
    assert json.loads((folder / "manifest.json").read_text())["optimizer"]["name"] == "adam"


def test_crash_mid_save_leaves_previous_checkpoint_intact(make_ps, tmp_path, monkeypatch):
    ps = trained_store(make_ps, 2)
    first = ps.save(tmp_path, step=1)
    before = ps.pull()
    ps.push({"b": np.ones(70, np.float32)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        ps.save(tmp_path, step=2)
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", first.name]  # no temporary left
    params = checkpoint.read(tmp_path).params
    for key in SHAPES:
        np.testing.assert_array_equal(params[key], before[key])


def test_keeps_only_the_newest_checkpoints(make_ps, tmp_path):
    ps = trained_store(make_ps, 1, steps=1)
    for step in (1, 2, 3):
        ps.save(tmp_path, step=step, keep=2)
    assert sorted(p.name[:13] for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt-00000002",
                                                                                            "ckpt-00000003"]
    newest = ps.save(tmp_path, step=0, keep=2)  # a new run reusing the folder: its save is never deleted
    assert checkpoint.latest(tmp_path) == newest and newest.is_dir()
    assert sorted(p.name[:13] for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt-00000000",
                                                                                            "ckpt-00000003"]


@pytest.mark.parametrize("crash_at", [0, 1])
def test_resaving_the_same_step_is_crash_safe_at_every_rename(make_ps, tmp_path, monkeypatch, crash_at):
    """``save(path)`` twice with the default step: a crash at either rename (folder, then LATEST) leaves
    LATEST naming a complete checkpoint, the old one. (It used to delete the old folder first.)"""
    ps = trained_store(make_ps, 2)
    ps.save(tmp_path)
    before = ps.pull()
    ps.push({"b": np.ones(70, np.float32)})
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) - 1 == crash_at:
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        ps.save(tmp_path)
    monkeypatch.undo()
    params = checkpoint.read(tmp_path).params
    for key in SHAPES:
        np.testing.assert_array_equal(params[key], before[key])
    after = ps.pull()
    ps.save(tmp_path)  # and a later save of the same step wins
    params = checkpoint.read(tmp_path).params
    np.testing.assert_array_equal(params["b"], after["b"])


def _corrupt_truncated(folder):
    path = folder / "arrays.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "arrays.npz"


def _corrupt_shape(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["keys"][0]["shape"] = [3, 3]
    (folder / "manifest.json").write_text(json.dumps(m))
    return "arrays.npz"


def _corrupt_manifest_field(folder):
    m = json.loads((folder / "manifest.json").read_text())
    m["num_shards"] = -4
    (folder / "manifest.json").write_text(json.dumps(m))
    return "manifest.json"


def _pickled_array(folder):
    with np.load(folder / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays["p0"] = np.array([{"evil": 1}], dtype=object)  # loading this would need pickle
    np.savez(folder / "arrays.npz", **arrays)
    return "arrays.npz"


def _escaping_latest(folder):
    (folder.parent / "LATEST").write_text("../../etc")
    return "LATEST"


def _not_json(folder):
    (folder / "manifest.json").write_text("{nope")
    return "manifest.json"


def _edit_manifest(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    return "manifest.json"


def _unknown_optimizer_field(folder):
    return _edit_manifest(folder, lambda m: m["optimizer"].update(warp=9))


def _absurd_shard_count(folder):
    return _edit_manifest(folder, lambda m: m.update(num_shards=10**9))


def _fifo_manifest(folder):
    (folder / "manifest.json").unlink()
    os.mkfifo(folder / "manifest.json")  # reading it would block forever
    return "manifest.json"


def _npy_header(shape) -> bytes:
    """A .npy file's header alone, declaring ``shape`` float32: its data is missing."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return np.lib.format.magic(1, 0) + buf.getvalue()


def _huge_declared_array(folder):
    """Manifest and header agree on 10^12 floats (4 TB): refused before allocating anything."""
    import zipfile

    _edit_manifest(folder, lambda m: m["keys"][0].update(shape=[10**12]))
    with zipfile.ZipFile(folder / "arrays.npz", "a") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        z.writestr("p0.npy", _npy_header((10**12,)))  # a second p0.npy; either one must be refused
    return "arrays.npz"


@pytest.mark.parametrize("corrupt", [_corrupt_truncated, _corrupt_shape, _corrupt_manifest_field, _pickled_array,
                                     _escaping_latest, _not_json, _unknown_optimizer_field, _absurd_shard_count,
                                     _fifo_manifest, _huge_declared_array])
def test_bad_checkpoint_gives_clear_error_and_starts_nothing(make_ps, tmp_path, corrupt):
    folder = trained_store(make_ps, 1, steps=1).save(tmp_path)
    culprit = corrupt(folder)
    groups_before = ray.util.placement_group_table()
    with pytest.raises(ValueError, match=culprit):
        shardps.restore(tmp_path)
    assert ray.util.placement_group_table() == groups_before


def test_members_the_manifest_does_not_name_are_never_read(make_ps, tmp_path):
    """An extra member (here one declaring 10^12 floats, which np.load would try to allocate) is ignored."""
    import zipfile

    ps = trained_store(make_ps, 1, steps=1)
    folder = ps.save(tmp_path)
    with zipfile.ZipFile(folder / "arrays.npz", "a") as z:
        z.writestr("extra.npy", _npy_header((10**12,)))
    params = checkpoint.read(tmp_path).params
    assert set(params) == set(SHAPES)


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        checkpoint.read(tmp_path)


def test_restarted_shard_rebuilds_exactly_its_own_part(make_ps, tmp_path):
    ps = make_ps(2, optimizer=Adam(lr=0.01), block_bytes=4096)
    rng = np.random.default_rng(1)
    ps.register({"z": rng.standard_normal((50, 40)).astype(np.float32), "a": np.ones(7, np.float32)})
    ps.register({"m": rng.standard_normal(3000).astype(np.float32)})  # a second call: order must survive
    ps.push({"z": np.ones((50, 40), np.float32), "m": np.ones(3000, np.float32)})
    ps.save(tmp_path, step=1)
    restored = shardps.restore(tmp_path)  # a restored store must also match what its restarted shards rebuild
    try:
        for store in (ps, restored):
            for i, shard in enumerate(store.shards):
                fresh = ParameterShard(i, Adam(lr=0.01))
                fresh._recover({"checkpoint_dir": str(tmp_path), "num_shards": 2, "block_bytes": 4096})  # as after a crash
                (want, _, _), (got, _, _) = ray.get(shard.export.remote()), fresh.export()
                assert set(got) == set(want)
                for dtype, (keys, sizes, params, state, steps) in want.items():
                    assert got[dtype][0] == keys
                    np.testing.assert_array_equal(got[dtype][1], sizes)
                    np.testing.assert_array_equal(got[dtype][2], params)
                    np.testing.assert_array_equal(got[dtype][4], steps)
                    for slot in state:
                        np.testing.assert_array_equal(got[dtype][3][slot], state[slot])
    finally:
        restored.shutdown()


def test_restarted_shard_refuses_another_stores_checkpoint(make_ps, tmp_path):
    other = make_ps(1, optimizer=shardps.SGD(lr=-1.0), checkpoint_dir=tmp_path, max_restarts=1)
    other.register({"w": np.full(4, 42, np.float32)})
    other.save(tmp_path)
    mine = make_ps(1, checkpoint_dir=tmp_path, max_restarts=1)  # same folder, nothing saved yet
    mine.register({"w": np.zeros(4, np.float32)})
    kill_and_wait(mine.shards[0])
    with pytest.raises(shardps.ShardUnavailableError, match="another store"):
        mine.pull(["w"])  # it used to answer with the other store's 42s


def test_restarted_shard_missing_keys_registered_after_the_save_says_so(make_ps, tmp_path):
    ps = make_ps(1, checkpoint_dir=tmp_path, max_restarts=1)
    ps.register({"a": np.ones(4, np.float32)})
    ps.save(tmp_path, step=7)
    ps.register({"b": np.ones(4, np.float32)})
    kill_and_wait(ps.shards[0])
    for call in (lambda: ps.pull(["a"]), lambda: ps.push({"a": np.ones(4, np.float32)})):
        with pytest.raises(shardps.ShardUnavailableError, match="checkpoint at step 7, which lacks"):
            call()


def test_restored_store_keeps_its_identity_for_restarts(make_ps, tmp_path):
    ps = trained_store(make_ps, 1)
    ps.save(tmp_path)
    restored = shardps.restore(tmp_path, checkpoint_dir=tmp_path, max_restarts=1)
    try:
        want = restored.pull()
        kill_and_wait(restored.shards[0])
        got = restored.pull()  # reloaded its own (restored) store's checkpoint
        for key in SHAPES:
            np.testing.assert_array_equal(got[key], want[key])
    finally:
        restored.shutdown()
