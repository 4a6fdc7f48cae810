"""Embedding-table building blocks (no Ray): placement, initial rows, segment sums, the row index."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps.store.initializers import Normal, Uniform, Zeros
from shardps.store.shard.index import RowIndex
from shardps.store.ids import as_ids, segment_sum, unique
from shardps.store.placement import shard_of_ids

ID = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "remove", "lookup"]), st.lists(ID, max_size=40)),
                max_size=25))
def test_row_index_answers_like_a_dict(ops):
    index, oracle = RowIndex(capacity=16), {}
    for op, ids in ops:
        ids = np.array(ids, np.int64)
        if op == "insert":
            new = np.array([i for i in dict.fromkeys(ids.tolist()) if i not in oracle], np.int64)
            slots = index.insert(new)
            assert len(set(slots.tolist())) == len(new)
            assert not set(slots.tolist()) & set(oracle.values())  # a slot is never shared
            oracle.update(zip(new.tolist(), slots.tolist()))
        elif op == "remove":
            freed = index.remove(ids)
            assert sorted(freed.tolist()) == sorted(oracle.pop(i) for i in set(ids.tolist()) if i in oracle)
        expected = [oracle.get(i, -1) for i in ids.tolist()]
        np.testing.assert_array_equal(index.lookup(ids), np.array(expected, np.int64).reshape(-1))
        assert len(index) == len(oracle)


def test_row_index_grows_and_stays_compact():
    index = RowIndex()
    ids = np.random.default_rng(0).choice(2**40, 200_000, replace=False).astype(np.int64)
    slots = index.insert(ids)
    np.testing.assert_array_equal(slots, np.arange(len(ids)))  # slots are dense: row arrays need no holes
    np.testing.assert_array_equal(index.lookup(ids[::-1]), slots[::-1])
    assert index.nbytes <= 12 / 0.4 * len(ids) + 12 * 16  # 12-byte cells, at most 1/0.4 per row right after growing
    with pytest.raises(ValueError):
        index.insert(ids[:3])  # already there


def test_removed_slots_are_reused():
    index = RowIndex()
    index.insert(np.arange(10))
    freed = index.remove(np.array([2, 5, 99]))
    assert sorted(freed.tolist()) == [2, 5]
    assert sorted(index.insert(np.array([100, 101, 102])).tolist()) == [2, 5, 10]


@pytest.mark.parametrize("init", [Zeros(), Uniform(-0.1, 0.1), Normal(0.5)], ids=lambda i: type(i).__name__)
def test_initial_rows_depend_only_on_seed_name_and_id(init):
    ids = np.array([7, -1, 2**62, 0, 12345], np.int64)
    rows = init.rows(ids, 6, name="user", seed=3)
    assert rows.shape == (5, 6) and rows.dtype == np.float32
    reordered = init.rows(ids[::-1], 6, name="user", seed=3)[::-1]  # another batch, another order
    np.testing.assert_array_equal(rows, reordered)
    np.testing.assert_array_equal(init.rows(ids[:1], 6, name="user", seed=3), rows[:1])
    if not isinstance(init, Zeros):
        assert not np.array_equal(init.rows(ids, 6, name="item", seed=3), rows)  # tables differ
        assert not np.array_equal(init.rows(ids, 6, name="user", seed=4), rows)  # seeds differ
        assert len(np.unique(rows)) == rows.size  # no repeated values across ids and columns


def test_initial_rows_have_the_distribution_asked_for():
    ids = np.arange(20_000)
    u = Uniform(-0.05, 0.05).rows(ids, 8, name="t", seed=0)
    assert u.min() >= -0.05 and u.max() < 0.05 and abs(u.mean()) < 1e-3
    n = Normal(0.2).rows(ids, 8, name="t", seed=0)
    assert abs(n.std() - 0.2) < 0.005 and abs(n.mean()) < 0.005
    with pytest.raises(ValueError):
        Uniform(1.0, 1.0)
    with pytest.raises(ValueError):
        Normal(-1.0)


def test_zipf_ids_spread_evenly_over_eight_shards():
    rng = np.random.default_rng(0)
    ids = np.unique(rng.zipf(1.15, 400_000) + 10**6 * rng.integers(0, 26, 400_000))  # 26 fields, Zipf each
    counts = np.bincount(shard_of_ids(ids, "user", 8), minlength=8)
    assert counts.max() / counts.mean() <= 1.05
    np.testing.assert_array_equal(shard_of_ids(ids, "user", 8), shard_of_ids(ids, "user", 8))


@settings(max_examples=50, deadline=None)
@given(st.lists(ID, min_size=1, max_size=300, unique=True), st.floats(0.3, 0.97))
def test_row_index_rebuilt_nearly_full_keeps_every_slot(ids, load):
    """A rebuild places entries in one pass; at high load many chains run past the last cell and wrap."""
    ids = np.array(ids, np.int64)
    index = RowIndex(capacity=16)
    slots = index.insert(ids)
    index._rebuild(max(len(ids) + 1, int(len(ids) / load)))
    np.testing.assert_array_equal(index.lookup(ids), slots)
    assert len(index) == len(ids) and (index.lookup(ids + 1)[~np.isin(ids + 1, ids)] == -1).all()


@given(st.lists(ID, max_size=200), st.sampled_from([1, 2]))
def test_unique_gives_what_np_unique_gives(values, ndim):
    values = np.array(values, np.int64).reshape((-1, 1) if ndim == 2 else (-1,))
    np.testing.assert_array_equal(unique(values), np.unique(values))


def test_segment_sum_adds_duplicate_ids_like_np_add_at():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 1000)
    grads = rng.standard_normal((1000, 4))
    unique, summed = segment_sum(ids, grads)
    expected = np.zeros((50, 4))
    np.add.at(expected, ids, grads)
    np.testing.assert_array_equal(unique, np.unique(ids))
    np.testing.assert_allclose(summed, expected[unique], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, error", [
    (np.array([1.0]), TypeError), (np.array([True]), TypeError), (np.array(["1"]), TypeError),
    (np.array([[1]]), ValueError), (np.array([2**63], np.uint64), ValueError),
])
def test_bad_ids_rejected(bad, error):
    with pytest.raises(error):
        as_ids(bad)
    np.testing.assert_array_equal(as_ids(np.array([1, 2], np.int32)), np.array([1, 2], np.int64))
