"""The ParameterShard as a plain class: vectorised apply, validation, exactly-once (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adam
from shardps.store.shard.actor import ParameterShard
from shardps.store.dedup import Tag
from shardps.store.wire import ROWS, from_wire, rows_from_wire, split, to_wire

F32 = np.dtype(np.float32).str


def pulled(shard, request=None):
    """The shard's float32 values for ``request``, decoded as the router would."""
    return from_wire(shard.pull((None, request))[1][F32], np.float32)


def shard_with(sizes, optimizer=None):
    shard = ParameterShard(0, optimizer or SGD(lr=1.0))
    data = np.arange(sum(sizes), dtype=np.float32)
    shard.register({F32: ([f"k{i}" for i in range(len(sizes))], list(sizes), data)})
    return shard, data


def test_push_all_segments_applies_to_whole_buffer():
    shard, data = shard_with([3, 4])
    grad = np.ones(7, np.float32)
    grad.flags.writeable = False  # as it arrives from Ray's object store
    assert shard.push_mean(None, {F32: (None, grad)}) == 1
    np.testing.assert_array_equal(pulled(shard), data - 1)


@pytest.mark.parametrize("encode", [np.asarray, to_wire], ids=["array", "bytes"])
def test_push_some_segments_touches_only_those(encode):
    shard, data = shard_with([3, 4, 2])
    shard.push_mean(None, {F32: (encode(np.array([0, 2], np.int64)), np.full(5, 2, np.float32))})
    np.testing.assert_array_equal(pulled(shard, {F32: encode(np.array([0, 1, 2], np.int64))}),
                                  data - np.array([2, 2, 2, 0, 0, 0, 0, 2, 2]))


def test_several_messages_are_averaged_into_one_update():
    shard, data = shard_with([4])
    shard.push_mean(None, {F32: (None, np.full(4, 1, np.float32))}, {F32: (None, np.full(4, 3, np.float32))})
    assert shard.stats()["pushes"] == 1
    np.testing.assert_array_equal(pulled(shard), data - 2)


def test_retried_push_with_same_sequence_number_is_applied_once():
    shard, data = shard_with([2])
    msg = {F32: (None, np.ones(2, np.float32))}
    shard.push_mean(("c", 0, None), msg)
    shard.push_mean(("c", 0, None), msg)
    shard.push_mean(("c", 1, None), msg)
    np.testing.assert_array_equal(pulled(shard), data - 2)


@pytest.mark.parametrize("msg", [
    {F32: (None, np.ones(6, np.float32))},               # wrong length
    {F32: (np.array([1, 0]), np.ones(7, np.float32))},   # ids not increasing
    {F32: (np.array([5]), np.ones(1, np.float32))},      # id out of range
    {F32: (np.array([0, 1], np.int64).tobytes()[:-3], np.ones(7, np.float32))},  # ids cut mid-element
    {np.dtype(np.float64).str: (None, np.ones(7))},      # dtype the shard does not hold
])
def test_malformed_push_changes_nothing(msg):
    shard, data = shard_with([3, 4])
    with pytest.raises(ValueError):
        shard.push_mean(None, msg)
    np.testing.assert_array_equal(pulled(shard), data)
    assert shard.stats()["pushes"] == 0


def test_adam_step_counts_per_segment():
    shard, _ = shard_with([2, 2], Adam(lr=0.1))
    shard.push_mean(None, {F32: (np.array([0]), np.ones(2, np.float32))})
    shard.push_mean(None, {F32: (None, np.ones(4, np.float32))})
    # first step of Adam moves by ~lr regardless of gradient size; segment 0 has had two steps
    start = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(start - pulled(shard), [0.2, 0.2, 0.1, 0.1], rtol=1e-4)


def test_staleness_recorded_from_base_version():
    shard, _ = shard_with([1])
    msg = {F32: (None, np.ones(1, np.float32))}
    shard.push_mean(Tag(base_version=0), msg)
    shard.push_mean(Tag(base_version=0), msg)
    shard.push_mean(Tag(base_version=2), msg)
    assert shard.stats()["staleness"] == {0: 2, 1: 1}


def test_per_segment_parts_and_their_mean_apply_like_one_array():
    shard, data = shard_with([3, 4])
    one = {F32: (None, np.arange(7, dtype=np.float32))}
    parts = {F32: (None, [np.arange(3, dtype=np.float32), np.arange(3, 7, dtype=np.float32)])}
    shard.push_mean(None, parts)
    np.testing.assert_array_equal(pulled(shard), data - np.arange(7))
    shard.push_mean(None, one, parts)  # sync mode: mixed forms are averaged
    np.testing.assert_array_equal(pulled(shard), data - 2 * np.arange(7))
    with pytest.raises(ValueError):
        shard.push_mean(None, {F32: (None, [np.ones(3, np.float32), np.ones(3, np.float32)])})


def test_register_resent_after_a_restart_is_a_no_op_and_overlap_is_refused():
    shard, data = shard_with([3, 4])
    shard.register({F32: (["k0", "k1"], [3, 4], np.zeros(7, np.float32))})  # the same keys again: a re-sent call
    np.testing.assert_array_equal(pulled(shard), data)
    with pytest.raises(ValueError, match="already registered"):
        shard.register({F32: (["k1", "k2"], [4, 1], np.zeros(5, np.float32))})
    assert shard.stats()["keys"] == 2 and shard.stats()["bytes"] == 28


def test_adopting_an_export_copies_everything():
    shard, _ = shard_with([3, 4], Adam(lr=0.1))
    shard.push_mean(("c", 0, None), {F32: (np.array([1]), np.ones(4, np.float32))})
    copy = ParameterShard(0, Adam(lr=0.1))
    copy.adopt(*shard.export())
    for shard_ in (shard, copy):  # the copy dedupes the same retry and moves like the original
        shard_.push_mean(("c", 0, None), {F32: (None, np.ones(7, np.float32))})
        shard_.push_mean(("c", 1, None), {F32: (None, np.ones(7, np.float32))})
    np.testing.assert_array_equal(pulled(copy), pulled(shard))
    (want, meta, _), (got, got_meta, _) = shard.export(), copy.export()
    assert meta == got_meta
    np.testing.assert_array_equal(got[F32][4], want[F32][4])  # per-segment Adam steps
    np.testing.assert_array_equal(got[F32][3]["m"], want[F32][3]["m"])
    with pytest.raises(ValueError):
        copy.replicate("pull", ())  # only changes are mirrored


@pytest.mark.parametrize("request_ids", [None, np.array([0, 2])])
def test_large_answer_comes_one_array_per_segment(request_ids):
    """Over 1 MiB, a pull answer is a list of views, one per segment (Ray copies each; no gather copy)."""
    sizes = [200_000, 150_000, 220_000]
    shard, data = shard_with(sizes)
    ids = list(range(len(sizes))) if request_ids is None else request_ids.tolist()
    answer = shard.pull((None, {F32: request_ids}))[1][F32]
    assert isinstance(answer, list) and [p.size for p in answer] == [sizes[i] for i in ids]
    starts = np.cumsum([0, *sizes])
    for i, part in zip(ids, split(answer, np.float32, [sizes[i] for i in ids])):
        np.testing.assert_array_equal(part, data[starts[i]:starts[i + 1]])


def test_answer_for_many_segments_is_one_array():
    shard, data = shard_with([5000] * 257)  # more segments than wire packs as separate arrays (256)
    answer = shard.pull((None, None))[1][F32]
    assert isinstance(answer, np.ndarray)
    np.testing.assert_array_equal(np.concatenate(split(answer, np.float32, [5000] * 257)), data)


def test_table_rows_as_bytes_apply_like_arrays_and_torn_ones_change_nothing():
    from shardps.store.optim import optimizer_config
    from shardps.store.initializers import Zeros, initializer_config

    spec = {"name": "t", "dim": 3, "dtype": F32, "initializer": initializer_config(Zeros()),
            "optimizer": optimizer_config(SGD(lr=-1.0)), "seed": 0, "min_count": 1, "max_rows": None}
    ids, grads = np.array([4, 9], np.int64), np.arange(6, dtype=np.float32).reshape(2, 3)
    answers = []
    for encode in (np.asarray, to_wire):
        shard = ParameterShard(0, SGD(lr=-1.0))
        shard.register_table(spec)
        shard.push_mean(None, {ROWS: {"t": (encode(ids), encode(grads))}})
        with pytest.raises(ValueError):  # grads not whole rows
            shard.push_mean(None, {ROWS: {"t": (encode(ids), grads.tobytes()[:-4])}})
        answer = shard.pull((None, {ROWS: {"t": encode(np.array([9, 4, 7], np.int64))}}))[1][ROWS]["t"]
        assert isinstance(answer, bytes)  # a small answer travels as bytes too
        answers.append(rows_from_wire(answer, np.float32, 3))
        assert shard.stats()["pushes"] == 1
    for rows in answers:
        np.testing.assert_array_equal(rows, [[3, 4, 5], [0, 1, 2], [0, 0, 0]])
