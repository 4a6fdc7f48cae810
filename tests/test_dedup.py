"""The shard's record of applied pushes (no Ray): exact in any arrival order, bounded, restorable."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps import SGD
from shardps.store.dedup import MAX_CLIENTS, AppliedRecord, Tag
from shardps.store.messages import pack_push, register_messages
from shardps.store.placement import HashPartitioner, Layout
from shardps.store.shard.actor import ParameterShard
from shardps.store.wire import from_wire

F32 = np.dtype(np.float32).str


def shard_of_w(size: int):
    """A one-shard store holding key ``w`` of ``size`` zeros (push adds), and the router's push of ones to it."""
    layout = Layout(HashPartitioner(1))
    shard = ParameterShard(0, SGD(lr=-1.0))
    shard.register(register_messages(layout, {"w": np.zeros(size, np.float32)})[0])
    return shard, pack_push(layout, {"w": np.ones(size, np.float32)}, {})[0]


def test_resent_push_overtaken_by_a_later_one_is_still_applied():
    """The lost-push defect: seq 1 arrives, then the re-send of seq 0 (lost to a restart) must apply."""
    shard, ones = shard_of_w(3)
    shard.push_mean(Tag("c", 1, 0), ones)
    shard.push_mean(Tag("c", 0, 0), ones)  # the re-send
    shard.push_mean(Tag("c", 0, 0), ones)  # and a duplicate of it
    shard.push_mean(Tag("c", 1, 2), ones)  # a duplicate below the floor
    np.testing.assert_array_equal(from_wire(shard.pull((None, None))[1][0][F32], np.float32), [2, 2, 2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=120), st.integers(0, 40))
def test_record_answers_exactly_like_a_set_of_everything_applied(arrivals, floor):
    """Oracle: a plain set of all applied numbers. Any order, duplicates, and a client floor below
    everything still unanswered (here: numbers below ``floor`` arrive only as duplicates)."""
    record, oracle = AppliedRecord(), set()
    for seq in [s for s in range(floor)] + arrivals:
        at_floor = floor if seq >= floor else 0  # originals below the floor were sent before it was raised
        new = record.is_new("c", seq, at_floor)
        assert new == (seq not in oracle)
        if new:
            record.add("c", seq)
            oracle.add(seq)


def test_record_keeps_only_what_is_above_the_floor():
    record = AppliedRecord()
    for seq in range(10_000):  # a client with 3 pushes in flight at a time
        assert record.is_new("c", seq, max(0, seq - 3))
        record.add("c", seq)
    floor, above = record.to_json()["c"]
    assert floor == 10_000 and above == []
    record.add("c", 10_005)
    assert record.to_json()["c"] == [10_000, [10_005]]


def test_record_forgets_the_least_recently_seen_clients_beyond_its_bound():
    record = AppliedRecord(max_clients=3)
    for client in "abcd":
        record.add(client, 0)
    record.is_new("b", 1, None)  # b seen again
    record.add("e", 0)
    assert list(record.to_json()) == ["d", "b", "e"]
    assert len(record) == 3


def test_record_round_trips_through_json_and_rejects_garbage():
    record = AppliedRecord()
    record.add("c", 0)
    record.add("c", 5)
    copy = AppliedRecord.from_json(record.to_json())
    assert copy.to_json() == {"c": [1, [5]]}
    assert not copy.is_new("c", 5, 0) and copy.is_new("c", 3, 0)
    for bad in [[], {"c": [1]}, {"c": ["1", []]}, {"c": [1, [True]]}, {"c": [-1, []]}, {3: [0, []]}]:
        with pytest.raises(ValueError):
            AppliedRecord.from_json(bad)


def test_a_shard_keeps_a_bounded_number_of_client_records():
    """2000 Router copies pushing once each used to leave 2000 entries in every shard (and checkpoint)."""
    shard, ones = shard_of_w(1)
    for client in range(2000):
        shard.push_mean(Tag(f"copy-{client}", 0, 0), ones)
    _, meta, _ = shard.export()
    assert len(meta["applied"]) == MAX_CLIENTS < 2000
    assert shard.stats()["pushes"] == 2000
