"""The ParameterShard as a plain class: vectorised apply, validation, exactly-once (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adam, ParameterShard

F32 = np.dtype(np.float32).str


def shard_with(sizes, optimizer=None):
    shard = ParameterShard(0, optimizer or SGD(lr=1.0))
    data = np.arange(sum(sizes), dtype=np.float32)
    shard.register({F32: ([f"k{i}" for i in range(len(sizes))], list(sizes), data)})
    return shard, data


def test_push_all_segments_applies_to_whole_buffer():
    shard, data = shard_with([3, 4])
    grad = np.ones(7, np.float32)
    grad.flags.writeable = False  # as it arrives from Ray's object store
    assert shard.push({F32: (None, grad)}) == 1
    _, out = shard.pull()
    np.testing.assert_array_equal(out[F32], data - 1)


def test_push_some_segments_touches_only_those():
    shard, data = shard_with([3, 4, 2])
    shard.push({F32: (np.array([0, 2]), np.full(5, 2, np.float32))})
    _, out = shard.pull({F32: np.array([0, 1, 2])})
    np.testing.assert_array_equal(out[F32], data - np.array([2, 2, 2, 0, 0, 0, 0, 2, 2]))


def test_several_messages_are_averaged_into_one_update():
    shard, data = shard_with([4])
    shard.push({F32: (None, np.full(4, 1, np.float32))}, {F32: (None, np.full(4, 3, np.float32))})
    assert shard.stats()["pushes"] == 1
    np.testing.assert_array_equal(shard.pull()[1][F32], data - 2)


def test_retried_push_with_same_sequence_number_is_applied_once():
    shard, data = shard_with([2])
    msg = {F32: (None, np.ones(2, np.float32))}
    shard.push(msg, client="c", seq=0)
    shard.push(msg, client="c", seq=0)
    shard.push(msg, client="c", seq=1)
    np.testing.assert_array_equal(shard.pull()[1][F32], data - 2)


@pytest.mark.parametrize("msg", [
    {F32: (None, np.ones(6, np.float32))},               # wrong length
    {F32: (np.array([1, 0]), np.ones(7, np.float32))},   # ids not increasing
    {F32: (np.array([5]), np.ones(1, np.float32))},      # id out of range
    {np.dtype(np.float64).str: (None, np.ones(7))},      # dtype the shard does not hold
])
def test_malformed_push_changes_nothing(msg):
    shard, data = shard_with([3, 4])
    with pytest.raises(ValueError):
        shard.push(msg)
    np.testing.assert_array_equal(shard.pull()[1][F32], data)
    assert shard.stats()["pushes"] == 0


def test_adam_step_counts_per_segment():
    shard, _ = shard_with([2, 2], Adam(lr=0.1))
    shard.push({F32: (np.array([0]), np.ones(2, np.float32))})
    shard.push({F32: (None, np.ones(4, np.float32))})
    # first step of Adam moves by ~lr regardless of gradient size; segment 0 has had two steps
    _, out = shard.pull()
    start = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(start - out[F32], [0.2, 0.2, 0.1, 0.1], rtol=1e-4)


def test_staleness_recorded_from_base_version():
    shard, _ = shard_with([1])
    msg = {F32: (None, np.ones(1, np.float32))}
    shard.push(msg, base_version=0)
    shard.push(msg, base_version=0)
    shard.push(msg, base_version=2)
    assert shard.stats()["staleness"] == {0: 2, 1: 1}
