"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine.

``multinode.py store DIR``: prints one JSON line: the nodes the shards ran
on, and what a pull returned after the node holding a shard was removed.

``multinode.py train DIR MODE REPLICAS``: trains with the shards on the
``ps_server`` nodes and the workers on the head (``shard_resources``,
``worker_resources``), removes a node holding a shard at 40% of the steps,
and prints the run's summary, the node removed, the head, the workers' nodes
and the shards' nodes before and after.
"""
import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

import shardps


def store(cluster, servers, checkpoint_dir: str) -> dict:
    ps = shardps.launch(2, optimizer=shardps.SGD(lr=-1.0), shard_resources={"ps_server": 0.01},
                        max_restarts=2, checkpoint_dir=checkpoint_dir, block_bytes=4096)
    ps.register({"w": np.zeros(20000, np.float32)})
    ps.push({"w": np.ones(20000, np.float32)})
    ps.save(checkpoint_dir, step=1)
    before = [s["node"] for s in ps.stats()]
    victim = next(n for n in servers if n.node_id == before[0])
    cluster.remove_node(victim)  # shard 0 dies with its node; Ray restarts it on the other server node
    ps.push({"w": np.ones(20000, np.float32)})  # re-sent to the restarted shard
    after = ps.stats()
    result = {"before": before, "after": [s["node"] for s in after], "victim": victim.node_id,
              "restored": [s["restored_step"] for s in after], "w": sorted(set(ps.pull(["w"])["w"].tolist()))}
    ps.shutdown()
    return result


def train(cluster, servers, checkpoint_dir: str, mode: str, replicas: int) -> dict:
    from shardps.training.config import TrainConfig
    from shardps.training.run import train

    steps = 100
    saves = {"checkpoint_dir": checkpoint_dir, "checkpoint_every": 10} if replicas == 1 else {}
    config = TrainConfig(mode=mode, num_shards=2, num_workers=2, steps=steps, model="mlp", dataset="digits",
                         eval_every=50, seed=3, replicas=replicas, shard_resources={"ps_server": 0.01},
                         worker_resources={"trainer": 0.01}, **saves)
    seen = {"head": ray.get_runtime_context().get_node_id()}

    def started(ps, workers) -> None:
        seen["ps"] = ps
        seen["workers"] = ray.get([w.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
                                   for w in workers])

    def progress(event):
        ps = seen["ps"]
        if "victim" not in seen and event["step"] >= 0.4 * steps:
            seen["before"] = [s["node"] for s in ps.stats()]
            victim = next(n for n in servers if n.node_id in seen["before"])  # never the head
            seen["victim"] = victim.node_id
            cluster.remove_node(victim)  # its shards (and any worker there) die with it
        if event["step"] >= event["total"]:
            seen["after"] = [s["node"] for s in ps.stats()]

    history = train(config, progress=progress, on_start=started,
                    step_delays=[0.02, 0.02] if mode != "sync" else None)
    seen.pop("ps")
    return {**seen, **history.summary()}


def main(scenario: str, checkpoint_dir: str, *args: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer": 2}}
                      if scenario == "train" else {"num_cpus": 1})
    servers = [cluster.add_node(num_cpus=1, resources={"ps_server": 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    try:
        if scenario == "store":
            result = store(cluster, servers, checkpoint_dir)
        else:
            result = train(cluster, servers, checkpoint_dir, args[0], int(args[1]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(result))  # after Ray is gone: a log line it forwards late would otherwise come last


if __name__ == "__main__":
    main(*sys.argv[1:])
