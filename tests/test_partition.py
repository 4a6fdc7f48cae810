"""Placement: deterministic, balanced, covering every element exactly once (no Ray)."""
import json
import subprocess
import sys

import numpy as np
import pytest

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
