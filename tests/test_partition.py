"""Placement: deterministic, balanced, covering every element exactly once (no Ray)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardps.store.placement import HashPartitioner, Layout
from tests.conftest import MNIST_CNN_SHAPES


def build(num_shards, shapes, block_bytes=64 * 1024, dtype=np.float32):
    layout = Layout(HashPartitioner(num_shards, block_bytes=block_bytes))
    for key in sorted(shapes):
        layout.add(key, shapes[key], dtype)
    return layout


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_mnist_cnn_most_loaded_shard_within_10_percent_of_mean(num_shards):
    loads = build(num_shards, MNIST_CNN_SHAPES).shard_bytes()
    assert max(loads) <= 1.10 * np.mean(loads), loads


@pytest.mark.parametrize("num_shards", [1, 3, 8])
def test_segments_cover_every_element_exactly_once(num_shards):
    shapes = {"big": (1000, 333), "small": (7,), "scalar": (), "mid": (40000,)}
    layout = build(num_shards, shapes, block_bytes=4096)
    for key, spec in layout.keys.items():
        covered = np.zeros(spec.size, int)
        for seg in spec.segments:
            covered[seg.start:seg.stop] += 1
        assert (covered == 1).all(), key
        assert len({seg.shard for seg in spec.segments}) == len(spec.segments)  # one range per shard


def test_big_tensor_spreads_over_all_shards():
    layout = build(8, {"dense": (3136, 1024)})
    assert {seg.shard for seg in layout.keys["dense"].segments} == set(range(8))


def test_shard_buffers_are_dense_in_registration_order():
    layout = build(3, {"a": (5000,), "b": (300, 300), "c": (3,)}, block_bytes=1024)
    for groups in layout.shard_segments:
        for segs in groups.values():
            assert [s.index for s in segs] == list(range(len(segs)))
            assert [s.offset for s in segs] == list(np.cumsum([0] + [s.size for s in segs[:-1]]))


_PLACEMENT_SCRIPT = """
import json, numpy as np
from shardps.store.placement import HashPartitioner, Layout
layout = Layout(HashPartitioner(5, block_bytes=2048))
for i in range(50):
    layout.add(f"layer{i}/kernel", (i + 1, 300), np.float32)
print(json.dumps({k: [(s.shard, s.start, s.stop) for s in v.segments] for k, v in layout.keys.items()}))
"""


def test_placement_identical_in_two_processes():
    outputs = [
        subprocess.run([sys.executable, "-c", _PLACEMENT_SCRIPT], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": str(seed), "PATH": ""}).stdout
        for seed in (1, 2)
    ]
    assert outputs[0] == outputs[1]
    placement = json.loads(outputs[0])
    assert len(placement) == 50 and len({s for segs in placement.values() for s, _, _ in segs}) == 5


@pytest.mark.parametrize("bad", [0, -1, 1.5, None])
def test_bad_num_shards_or_block_bytes_rejected(bad):
    with pytest.raises(ValueError, match="num_shards"):
        HashPartitioner(bad)
    with pytest.raises(ValueError, match="block_bytes"):
        HashPartitioner(2, block_bytes=bad)


@pytest.mark.parametrize("resources", [{"CPU": 1}, {"ps": 0}, {"ps": "1"}, {"ps": float("nan")}, ["ps"], {"": 1}])
def test_launch_refuses_bad_shard_resources_before_ray_starts(monkeypatch, resources):
    import shardps

    monkeypatch.setattr("shardps.store.cluster.start_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ValueError, match="`shard_resources`"):
        shardps.launch(1, shard_resources=resources)


@settings(max_examples=60, deadline=None)
@given(num_shards=st.integers(1, 5), ids=st.lists(st.integers(0, 2**63 - 1) | st.integers(0, 40), max_size=60))
def test_rows_are_routed_to_the_shard_of_their_id_and_answers_come_back_in_the_asked_order(num_shards, ids):
    """Oracle: ``shard_of_ids`` for each id on its own. Each shard is sent exactly its ids, ascending, with
    their summed gradients; each asked id (repeats, any order) gets the row its shard answered for it."""
    from shardps.store import messages
    from shardps.store.placement import shard_of_ids
    from shardps.store.tables import TableSpec

    layout = Layout(HashPartitioner(num_shards))
    layout.tables["t"] = TableSpec("t", 2)
    ids = np.array(ids, np.int64)
    grads = np.stack([ids % 7, np.ones(len(ids))], axis=1).astype(np.float32)
    sent = messages.pack_push(layout, {}, messages.row_grads(layout, {"t": (ids, grads)}))
    for shard, message in enumerate(sent):
        mine = np.unique(ids[shard_of_ids(ids, "t", num_shards) == shard])
        if not len(mine):
            assert message is None
            continue
        got_ids, got_grads = (np.frombuffer(data, dtype) for data, dtype in zip(message[1]["t"], (np.int64, np.float32)))
        np.testing.assert_array_equal(got_ids, mine)
        np.testing.assert_array_equal(got_grads.reshape(-1, 2)[:, 1], [np.sum(ids == i) for i in mine])
    plan = messages.plan_pull(layout, [], {"t": ids})
    asked = [s for s, request in enumerate(plan.requests) if request is not None]
    answers = []
    for s in asked:  # a shard answers each id it was asked for with the row (id mod a prime, shard): exact in float32
        asked_ids = np.frombuffer(plan.requests[s][1]["t"], np.int64)
        assert (shard_of_ids(asked_ids, "t", num_shards) == s).all()
        answers.append((0, ({}, {"t": np.stack([asked_ids % 1_000_003, np.full(len(asked_ids), s)], 1).astype(np.float32)})))
    rows = plan.unpack(asked, answers)["t"]
    np.testing.assert_array_equal(rows[:, 0], ids % 1_000_003)
    np.testing.assert_array_equal(rows[:, 1], shard_of_ids(ids, "t", num_shards))
