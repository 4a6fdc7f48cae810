"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine.

Prints one JSON line: the nodes the shards ran on, and what a pull returned
after the node holding a shard was removed.
"""
import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

import shardps


def main(checkpoint_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1, resources={"ps_server": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        ps = shardps.launch(2, optimizer=shardps.SGD(lr=-1.0), shard_resources={"ps_server": 0.01},
                            max_restarts=2, checkpoint_dir=checkpoint_dir, block_bytes=4096)
        ps.register({"w": np.zeros(20000, np.float32)})
        ps.push({"w": np.ones(20000, np.float32)})
        ps.save(checkpoint_dir, step=1)
        before = [s["node"] for s in ps.stats()]
        victim = next(n for n in workers if n.node_id == before[0])
        cluster.remove_node(victim)  # shard 0 dies with its node; Ray restarts it on the other server node
        ps.push({"w": np.ones(20000, np.float32)})  # re-sent to the restarted shard
        after = ps.stats()
        print(json.dumps({"before": before, "after": [s["node"] for s in after], "victim": victim.node_id,
                          "restored": [s["restored_step"] for s in after],
                          "w": sorted(set(ps.pull(["w"])["w"].tolist()))}))
        ps.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
