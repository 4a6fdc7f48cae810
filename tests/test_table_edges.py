"""The edge of the table surface: inputs refused up front (naming the argument or the file and entry),
nothing changed by a refused call, the limits the docs promise."""
import tracemalloc

import numpy as np
import pytest

import shardps
from shardps import Adagrad, Adam, SGD, Uniform
from shardps.store import checkpoint, cluster
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.tables import COUNT_SLOTS, TableSpec
from tests.ckpt import DIM, edit_manifest as _edit_manifest, rows as _rows, write as _write


def test_the_helper_writes_a_checkpoint_that_reads_back(tmp_path):
    _write(tmp_path)
    saved = checkpoint.read(tmp_path)
    np.testing.assert_array_equal(saved.tables["t"]["ids"], [1, 2, 3])


# ---- 2: table state checked like dense state, optimizer slots against their invariants ----------------
@pytest.mark.parametrize("broken, where", [
    (lambda rows: rows["params"].__setitem__((0, 0), np.nan), "rows of table 't' hold NaN"),
    (lambda rows: rows["slot.accumulator"].__setitem__((1, 1), np.inf), "'accumulator' of table 't'"),
    (lambda rows: rows["slot.accumulator"].__setitem__((1, 1), -1.0), "'accumulator' of table 't' holds negative"),
    (lambda rows: rows["steps"].__setitem__(2, -3), "table 't': negative steps"),
])
def test_impossible_table_state_is_refused_naming_the_file_and_table(tmp_path, broken, where):
    rows = _rows([1, 2, 3])
    broken(rows)
    _write(tmp_path, tables={"t": (TableSpec("t", DIM).to_json(), rows)})
    with pytest.raises(ValueError, match=where) as error:
        checkpoint.read(tmp_path)
    assert "arrays.npz" in str(error.value)


def test_a_negative_adam_second_moment_of_a_dense_key_or_a_table_is_refused(tmp_path):
    adam = Adam(lr=0.01)
    rows = _rows([1, 2], optimizer=adam)
    rows["slot.v"][0, 0] = -1e-3  # one push would turn the row NaN: sqrt of a negative number
    _write(tmp_path / "table", tables={"t": (TableSpec("t", DIM, optimizer=adam).to_json(), rows)})
    with pytest.raises(ValueError, match="'v' of table 't' holds negative"):
        checkpoint.read(tmp_path / "table")
    w = np.zeros(3, np.float32)
    _write(tmp_path / "dense", state={"w": {"m": w, "v": np.array([0, -1, 0], np.float32)}})
    with pytest.raises(ValueError, match="'v' of key 'w' holds negative"):
        checkpoint.read(tmp_path / "dense")


# ---- 3: the manifest is checked as a whole before any shard starts --------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda m: m["tables"].append(dict(m["tables"][0])), "used twice"),  # a table named twice
    (lambda m: m["tables"][0].update(name="w"), "used twice"),  # named like a dense key
    (lambda m: m["tables"][0].update(name="t\ud800"), "UTF-8"),  # a lone surrogate
    (lambda m: m["keys"][0].update(name="w\udfff"), "UTF-8"),
    (lambda m: m["tables"][0].update(min_count=2), "count_slots"),  # edited: its counters are not in the file
    (lambda m: m["tables"][0].update(min_count=300), "min_count"),
    (lambda m: m["tables"][0].update(dim=2**40), "dim"),
    (lambda m: m["tables"][0].update(optimizer={"name": "momentum", "lr": 0.1, "momentum": 0.9}), "Momentum"),
])
def test_a_bad_manifest_is_refused_naming_the_file_and_entry_before_anything_starts(tmp_path, monkeypatch,
                                                                                   edit, match):
    folder = _write(tmp_path)
    _edit_manifest(folder, edit)
    monkeypatch.setattr(cluster, "launch", lambda *a, **k: pytest.fail("shards started"))
    with pytest.raises(ValueError, match=match) as error:
        shardps.restore(tmp_path)
    assert "manifest.json" in str(error.value)


def test_duplicate_ids_inside_a_table_are_refused(tmp_path):
    _write(tmp_path, tables={"t": (TableSpec("t", DIM).to_json(), _rows([5, 9, 5]))})
    with pytest.raises(ValueError, match="table 't' holds an id twice"):
        checkpoint.read(tmp_path)


# ---- 4: only sizes the code writes, declared sizes checked against the file before allocating -----------
def test_a_huge_count_slots_is_refused_without_allocating_it(tmp_path):
    spec = TableSpec("t", DIM, min_count=2).to_json()
    folder = _write(tmp_path, tables={"t": (spec, _rows([1, 2], count_slots=COUNT_SLOTS))})
    _edit_manifest(folder, lambda m: m["tables"][0].update(count_slots=2**30))
    _refused_without_allocating(tmp_path, "count_slots")


def test_declared_sizes_beyond_the_file_are_refused_before_anything_is_read(tmp_path):
    folder = _write(tmp_path)
    _edit_manifest(folder, lambda m: m["tables"][0].update(rows=10**8, dim=64))  # ~50 GB declared, 1 KB stored
    _refused_without_allocating(tmp_path, "more than the file holds")


def _refused_without_allocating(path, match: str) -> None:
    """``checkpoint.read(path)`` raises ``ValueError`` matching ``match`` with less than 50 MB traced."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            checkpoint.read(path)
        assert tracemalloc.get_traced_memory()[1] < 50 << 20
    finally:
        tracemalloc.stop()


# ---- 5: a large pull of ids without rows stays within ~2x its answer --------------------------------------
def test_pulling_a_million_unseen_ids_peaks_within_twice_the_answer():
    table = EmbeddingTable("t", 16, initializer=Uniform(-1, 1), optimizer=Adagrad(lr=0.1))
    table.push(np.arange(1000), np.ones((1000, 16), np.float32))  # some rows exist, most asked for do not
    ids = np.arange(500, 1_000_500, dtype=np.int64)
    tracemalloc.start()
    try:
        rows = table.pull(ids)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * rows.nbytes, f"peak {peak / 2**20:.0f} MiB for a {rows.nbytes / 2**20:.0f} MiB answer"
    fresh = EmbeddingTable("t", 16, initializer=Uniform(-1, 1), optimizer=Adagrad(lr=0.1))
    np.testing.assert_array_equal(rows[:500], table.pull(ids[:500]))  # ids 500..999 have rows
    np.testing.assert_array_equal(rows[500:], fresh.pull(ids[500:]))  # the others: their initial rows, in every chunk
    assert not np.array_equal(rows[:500], fresh.pull(ids[:500]))
    sample = np.array([500, 65_535, 65_536, 131_072, 999_999])  # across chunk boundaries, against the initializer
    np.testing.assert_array_equal(rows[sample], Uniform(-1, 1).rows(ids[sample], 16, name="t", seed=0))


# ---- 7, 8: bad arguments get the documented error naming the argument --------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"optimizer": "adam"}, "`optimizer`"), ({"initializer": "uniform"}, "`initializer`"),
    ({"dim": 2**40}, "`dim` must be at most"), ({"dim": 0}, "`dim`"), ({"dtype": "int8"}, "`dtype`"),
    ({"min_count": 256}, "`min_count`"), ({"optimizer": shardps.Momentum(lr=0.1)}, "Momentum"),
])
def test_table_spec_refuses_bad_arguments_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TableSpec(**{"name": "t", "dim": DIM, **kwargs})


def test_max_rows_bounds_the_whole_table():
    assert TableSpec("t", DIM, max_rows=7).for_shard(2)["max_rows"] == 3  # 2 shards hold at most 6 <= 7
    assert TableSpec("t", DIM, max_rows=8).for_shard(8)["max_rows"] == 1
    with pytest.raises(ValueError, match="`max_rows`"):
        TableSpec("t", DIM, max_rows=3).for_shard(4)  # a shard would hold no row


@pytest.fixture
def table_ps(make_ps):
    ps = make_ps(2, optimizer=SGD(lr=-1.0))
    ps.register({"w": np.zeros(3, np.float32)})
    ps.register_table("t", DIM, initializer=Uniform(-1, 1), optimizer=SGD(lr=-1.0))
    ps.table("t").push([1, 2, 3], np.ones((3, DIM), np.float32))
    return ps


def _everything(ps):
    got = ps.pull(rows={"t": np.arange(10)})
    return got, ps.tables()


@pytest.mark.parametrize("call", [
    lambda ps: ps.register({"t": np.zeros(3, np.float32)}),  # 1: a dense key named like a table
    lambda ps: ps.register_table("w", DIM),  # and a table named like a key
    lambda ps: ps.push({}, rows="t"), lambda ps: ps.push({}, rows=[("t", ([1], np.ones((1, DIM))))]),
    lambda ps: ps.pull([], rows="t"), lambda ps: ps.pull([], rows=[1, 2]),
    lambda ps: ps.register_table("u", DIM, optimizer="adam"),
    lambda ps: ps.register_table("u", 2**40),
    lambda ps: ps.register_table("u", DIM, max_rows=1),  # 2 shards: one would hold no row
])
def test_refused_table_calls_change_nothing(table_ps, call):
    before = _everything(table_ps)
    with pytest.raises((TypeError, ValueError)) as error:
        call(table_ps)
    assert "rows" in str(error.value) or "Argument" in str(error.value) or "registered" in str(error.value) \
        or "table" in str(error.value)
    after = _everything(table_ps)
    assert set(after[0]) == set(before[0]) and after[1] == before[1]
    for name in before[0]:
        np.testing.assert_array_equal(after[0][name], before[0][name])


def test_max_rows_holds_for_the_whole_table_also_after_a_restore_into_more_shards(make_ps, tmp_path):
    ps = make_ps(1, optimizer=SGD(lr=-1.0))
    ps.register_table("t", DIM, initializer=shardps.Zeros(), optimizer=SGD(lr=-1.0), max_rows=7)
    for step in range(20):
        ps.table("t").push([step], np.full((1, DIM), step, np.float32))
    assert ps.table("t").stats()["rows"] == 7
    ps.save(tmp_path)
    restored = shardps.restore(tmp_path, num_shards=2)
    try:
        stats = restored.table("t").stats()
        assert stats["rows"] <= 7 and max(stats["rows_per_shard"]) <= 3
        kept = restored.table("t").pull(np.arange(20))[:, 0]
        newest = set(range(13, 20))  # the rows a cap of 7 keeps, by last update
        assert {i for i in range(20) if kept[i] == i and i > 0} <= newest
    finally:
        restored.shutdown()
    with pytest.raises(ValueError, match="`max_rows`"):
        shardps.restore(tmp_path, num_shards=8)  # 7 rows cannot give 8 shards one each


def test_max_rows_three_on_two_shards_holds_at_most_three_rows(make_ps):
    ps = make_ps(2, optimizer=SGD(lr=-1.0))
    ps.register_table("t", DIM, max_rows=3)
    ps.table("t").push(np.arange(50), np.ones((50, DIM), np.float32))
    assert ps.table("t").stats()["rows"] <= 3
