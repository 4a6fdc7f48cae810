"""The ParameterShard as a plain class: vectorised apply, validation, exactly-once (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adam, Zeros
from shardps.store import messages
from shardps.store.dedup import Tag
from shardps.store.placement import HashPartitioner, Layout
from shardps.store.shard.actor import ParameterShard
from shardps.store.tables import TableSpec
from shardps.store.wire import from_wire, rows_from_wire, split, to_wire

F32 = np.dtype(np.float32).str


def layout_of(sizes) -> Layout:
    layout = Layout(HashPartitioner(1, block_bytes=1 << 30))
    for i, size in enumerate(sizes):
        layout.add(f"k{i}", (size,), np.float32)
    return layout


def grads(sizes, **values):
    """The push message the router builds for ``values`` (key -> array) on a one-shard store of ``sizes``."""
    flats = {k: np.asarray(v, np.float32) for k, v in values.items()}
    return messages.pack_push(layout_of(sizes), flats, {})[0]


def pulled(shard, request=None):
    """The shard's float32 values for ``request`` (dense part), decoded as the router would."""
    return from_wire(shard.pull((None, None if request is None else (request, {})))[1][0][F32], np.float32)


def shard_with(sizes, optimizer=None):
    shard = ParameterShard(0, optimizer or SGD(lr=1.0))
    data = np.arange(sum(sizes), dtype=np.float32)
    arrays = {f"k{i}": part for i, part in enumerate(np.split(data, np.cumsum(sizes)[:-1]))}
    shard.register(messages.register_messages(Layout(HashPartitioner(1, block_bytes=1 << 30)), arrays)[0])
    return shard, data


def everything(sizes, value: float):
    """A push of ``value`` to every key of a one-shard store of ``sizes``."""
    return grads(sizes, **{f"k{i}": np.full(n, value) for i, n in enumerate(sizes)})


def test_push_all_segments_applies_to_whole_buffer():
    shard, data = shard_with([3, 4])
    message = everything([3, 4], 1.0)
    assert isinstance(message[0][F32][1], bytes)  # small data travels as bytes: read-only when decoded
    assert shard.push_mean(None, message) == 1
    np.testing.assert_array_equal(pulled(shard), data - 1)


@pytest.mark.parametrize("encode", [np.asarray, to_wire], ids=["array", "bytes"])
def test_push_some_segments_touches_only_those(encode):
    shard, data = shard_with([3, 4, 2])
    (dense, rows) = grads([3, 4, 2], k0=np.full(3, 2), k2=np.full(2, 2))
    ids, data_ = dense[F32]
    shard.push_mean(None, ({F32: (encode(from_wire(ids, np.int64)), data_)}, rows))
    np.testing.assert_array_equal(pulled(shard, {F32: encode(np.array([0, 1, 2], np.int64))}),
                                  data - np.array([2, 2, 2, 0, 0, 0, 0, 2, 2]))


def test_several_messages_are_averaged_into_one_update():
    shard, data = shard_with([4])
    shard.push_mean(None, everything([4], 1), everything([4], 3))
    assert shard.stats()["pushes"] == 1
    np.testing.assert_array_equal(pulled(shard), data - 2)


def test_retried_push_with_same_sequence_number_is_applied_once():
    shard, data = shard_with([2])
    msg = everything([2], 1)
    shard.push_mean(("c", 0, None), msg)
    shard.push_mean(("c", 0, None), msg)
    shard.push_mean(("c", 1, None), msg)
    np.testing.assert_array_equal(pulled(shard), data - 2)


@pytest.mark.parametrize("msg", [  # by hand: the router never builds these
    ({F32: (None, np.ones(6, np.float32))}, {}),               # wrong length
    ({F32: (np.array([1, 0]), np.ones(7, np.float32))}, {}),   # ids not increasing
    ({F32: (np.array([5]), np.ones(1, np.float32))}, {}),      # id out of range
    ({F32: (np.array([0, 1], np.int64).tobytes()[:-3], np.ones(7, np.float32))}, {}),  # ids cut mid-element
    ({np.dtype(np.float64).str: (None, np.ones(7))}, {}),      # dtype the shard does not hold
    {F32: (None, np.ones(7, np.float32))},                     # not a (dense, rows) pair
])
def test_malformed_push_changes_nothing(msg):
    shard, data = shard_with([3, 4])
    with pytest.raises(ValueError):
        shard.push_mean(None, msg)
    np.testing.assert_array_equal(pulled(shard), data)
    assert shard.stats()["pushes"] == 0


def test_adam_step_counts_per_segment():
    shard, _ = shard_with([2, 2], Adam(lr=0.1))
    shard.push_mean(None, grads([2, 2], k0=np.ones(2)))
    shard.push_mean(None, everything([2, 2], 1))
    # first step of Adam moves by ~lr regardless of gradient size; segment 0 has had two steps
    start = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(start - pulled(shard), [0.2, 0.2, 0.1, 0.1], rtol=1e-4)


def test_staleness_recorded_from_base_version():
    shard, _ = shard_with([1])
    msg = everything([1], 1)
    shard.push_mean(Tag(base_version=0), msg)
    shard.push_mean(Tag(base_version=0), msg)
    shard.push_mean(Tag(base_version=2), msg)
    assert shard.stats()["staleness"] == {0: 2, 1: 1}


def test_per_segment_parts_and_their_mean_apply_like_one_array():
    shard, data = shard_with([3, 4])
    one = grads([3, 4], k0=np.arange(3), k1=np.arange(3, 7))
    parts = ({F32: (None, [np.arange(3, dtype=np.float32), np.arange(3, 7, dtype=np.float32)])}, {})  # large form
    shard.push_mean(None, parts)
    np.testing.assert_array_equal(pulled(shard), data - np.arange(7))
    shard.push_mean(None, one, parts)  # sync mode: mixed forms are averaged
    np.testing.assert_array_equal(pulled(shard), data - 2 * np.arange(7))
    with pytest.raises(ValueError):
        shard.push_mean(None, ({F32: (None, [np.ones(3, np.float32), np.ones(3, np.float32)])}, {}))


def test_register_resent_after_a_restart_is_a_no_op_and_overlap_is_refused():
    shard, data = shard_with([3, 4])
    again = {"k0": np.zeros(3, np.float32), "k1": np.zeros(4, np.float32)}
    shard.register(messages.register_messages(Layout(HashPartitioner(1)), again)[0])  # a re-sent call
    np.testing.assert_array_equal(pulled(shard), data)
    overlap = {"k1": np.zeros(4, np.float32), "k2": np.zeros(1, np.float32)}
    with pytest.raises(ValueError, match="already registered"):
        shard.register(messages.register_messages(Layout(HashPartitioner(1)), overlap)[0])
    assert shard.stats()["keys"] == 2 and shard.stats()["bytes"] == 28


def test_adopting_an_export_copies_everything():
    shard, _ = shard_with([3, 4], Adam(lr=0.1))
    shard.push_mean(("c", 0, None), grads([3, 4], k1=np.ones(4)))
    copy = ParameterShard(0, Adam(lr=0.1))
    copy.adopt(*shard.export())
    for shard_ in (shard, copy):  # the copy dedupes the same retry and moves like the original
        shard_.push_mean(("c", 0, None), everything([3, 4], 1))
        shard_.push_mean(("c", 1, None), everything([3, 4], 1))
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
    answer = shard.pull((None, ({F32: request_ids}, {})))[1][0][F32]
    assert isinstance(answer, list) and [p.size for p in answer] == [sizes[i] for i in ids]
    starts = np.cumsum([0, *sizes])
    for i, part in zip(ids, split(answer, np.float32, [sizes[i] for i in ids])):
        np.testing.assert_array_equal(part, data[starts[i]:starts[i + 1]])


def test_answer_for_many_segments_is_one_array():
    shard, data = shard_with([5000] * 257)  # more segments than wire packs as separate arrays (256)
    answer = shard.pull((None, None))[1][0][F32]
    assert isinstance(answer, np.ndarray)
    np.testing.assert_array_equal(np.concatenate(split(answer, np.float32, [5000] * 257)), data)


def test_table_rows_as_bytes_apply_like_arrays_and_torn_ones_change_nothing():
    spec = TableSpec("t", 3, Zeros(), SGD(lr=-1.0))
    layout = Layout(HashPartitioner(1), tables={"t": spec})
    ids, grads_ = np.array([4, 9], np.int64), np.arange(6, dtype=np.float32).reshape(2, 3)
    _, rows = messages.pack_push(layout, {}, messages.row_grads(layout, {"t": (ids, grads_)}))[0]
    wire_ids, wire_grads = rows["t"]
    assert isinstance(wire_ids, bytes) and isinstance(wire_grads, bytes)  # small: as bytes
    large_form = (from_wire(wire_ids, np.int64), rows_from_wire(wire_grads, np.float32, 3))  # as arrays
    answers = []
    for sent in ((wire_ids, wire_grads), large_form):
        as_sent = ({}, {"t": sent})
        shard = ParameterShard(0, SGD(lr=-1.0))
        shard.register_table(spec.for_shard(1))
        shard.push_mean(None, as_sent)
        with pytest.raises(ValueError):  # grads not whole rows (by hand: the router never builds these)
            shard.push_mean(None, ({}, {"t": (wire_ids, grads_.tobytes()[:-4])}))
        plan = messages.plan_pull(layout, [], {"t": np.array([9, 4, 7])})
        reply = shard.pull((None, plan.requests[0]))
        assert isinstance(reply[1][1]["t"], bytes)  # a small answer travels as bytes too
        answers.append(plan.unpack([0], [reply])["t"])
        assert shard.stats()["pushes"] == 1
    for rows_ in answers:
        np.testing.assert_array_equal(rows_, [[3, 4, 5], [0, 1, 2], [0, 0, 0]])
