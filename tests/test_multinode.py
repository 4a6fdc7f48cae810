"""Multi-node behaviour on ray.cluster_utils.Cluster (head + 2 nodes), each scenario in its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args) -> dict:
    script = Path(__file__).parent / "scripts" / "multinode.py"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                         timeout=900, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_shards_spread_over_nodes_and_restart_elsewhere_when_a_node_goes(tmp_path):
    result = _run("store", tmp_path)
    assert len(set(result["before"])) == 2  # SPREAD: one shard per server node
    assert result["after"][0] != result["victim"] and result["after"][0] in result["before"]
    assert result["restored"][0] == 1  # shard 0 reloaded the checkpoint taken at step 1
    # the checkpoint held 1 everywhere; shard 0's part then got the re-sent push (2), shard 1 kept both (2)
    assert result["w"] == [2.0]


@pytest.mark.parametrize("mode, replicas, source", [("async", 1, "checkpoint"), ("sync", 2, "replica")])
def test_node_removed_mid_training_restarts_its_shards_elsewhere(tmp_path, mode, replicas, source):
    result = _run("train", tmp_path, mode, replicas)
    lost = [i for i, node in enumerate(result["before"]) if node == result["victim"]]
    assert lost, "the removed node held no shard"
    assert result["steps"] == 100 and result["final_accuracy"] > 0.8
    assert [(r["shard"], r["from"]) for r in result["recoveries"]] == [(i, source) for i in lost]
    assert result["victim"] not in result["after"]  # the lost shards run on surviving nodes now
    # placed by shard_resources / worker_resources: shards on the two ps_server nodes, workers on the head only
    assert len(set(result["before"])) == 2 and result["head"] not in result["before"] + result["after"]
    assert result["workers"] == [result["head"]] * 2
