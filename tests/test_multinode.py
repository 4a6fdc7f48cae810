"""Multi-node behaviour on ray.cluster_utils.Cluster (head + 2 nodes), in its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path


def test_shards_spread_over_nodes_and_restart_elsewhere_when_a_node_goes(tmp_path):
    script = Path(__file__).parent / "scripts" / "multinode.py"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(set(result["before"])) == 2  # SPREAD: one shard per server node
    assert result["after"][0] != result["victim"] and result["after"][0] in result["before"]
    assert result["restored"][0] == 1  # shard 0 reloaded the checkpoint taken at step 1
    # the checkpoint held 1 everywhere; shard 0's part then got the re-sent push (2), shard 1 kept both (2)
    assert result["w"] == [2.0]
