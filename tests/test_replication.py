"""Replication (``launch(replicas=2)``): every acknowledged push survives the death of a shard or its replica.

The oracle: pushes of ones through ``SGD(lr=-1)`` (the server adds) leave
every element equal to the number of acknowledged pushes, exactly.
"""
import os
import signal
import threading

import numpy as np
import pytest
import ray

import shardps
from shardps import SGD, Adam, ShardUnavailableError
from shardps.store.cluster import pair_bundles

SHAPES = {"big": (300, 250), "a": (7,), "b": (3, 5)}  # "big" (300 KB): split, > 100 KB per shard: sent as a ref


def _ones():
    return {k: np.ones(s, np.float32) for k, s in SHAPES.items()}


def _pid(actor) -> int:
    return ray.get(actor.stats.remote())["pid"]


def _same_export(ps) -> None:
    """Each shard and its replica hold identical parameters, optimizer state, steps and dedupe tables."""
    for shard, replica in zip(ps.shards, ps.replicas):
        (mine, meta, _), (theirs, their_meta, _) = ray.get([shard.export.remote(), replica.export.remote()])
        assert meta == their_meta and set(mine) == set(theirs)
        for dtype, (keys, sizes, params, state, steps) in mine.items():
            assert theirs[dtype][0] == keys
            for want, got in zip((sizes, params, steps), (theirs[dtype][1], theirs[dtype][2], theirs[dtype][4])):
                np.testing.assert_array_equal(got, want)
            for slot, data in state.items():
                np.testing.assert_array_equal(theirs[dtype][3][slot], data)


def test_replica_mirrors_every_change(make_ps, tmp_path):
    ps = make_ps(2, optimizer=Adam(lr=0.01), replicas=2, block_bytes=4096)
    rng = np.random.default_rng(0)
    ps.register({k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()})
    ps.push(_ones())
    ps.push({"a": np.full(7, 2, np.float32)})  # uneven Adam steps per key
    ps.push_pull({"b": np.ones((3, 5), np.float32)}, ["b"])
    ps.save(tmp_path, step=1)
    restored = shardps.restore(tmp_path, replicas=2)  # register + load_optimizer_state are mirrored too
    try:
        for store in (ps, restored):
            _same_export(store)
    finally:
        restored.shutdown()


def test_killed_shards_and_replicas_lose_no_acknowledged_push(make_ps):
    ps = make_ps(2, optimizer=SGD(lr=-1.0), replicas=2, block_bytes=4096)
    ps.register({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    victims = [_pid(ps.shards[0]), _pid(ps.replicas[1]), _pid(ps.shards[1])]  # shard 1 dies after its replica came back
    total, kill_at = 90, [20, 45, 70]
    reached = [threading.Event() for _ in kill_at]
    done, errors = [0], []

    def pusher():
        try:
            for i in range(total):
                ps.push(_ones())  # returns only once both copies applied it
                done[0] = i + 1
                for at, event in zip(kill_at, reached):
                    if done[0] == at:
                        event.set()
        except BaseException as exc:  # reported below: the main thread is blocked on the events
            errors.append(exc)
            for event in reached:
                event.set()

    thread = threading.Thread(target=pusher)
    thread.start()
    for event, pid in zip(reached, victims):
        assert event.wait(timeout=300)
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not errors, errors
    assert done[0] == total
    pulled = ps.pull()
    for key, shape in SHAPES.items():
        np.testing.assert_array_equal(pulled[key], np.full(shape, total, np.float32))
    stats = ps.stats()
    # shard 1 came back from a replica that had itself died and restarted blank: only the resync filled it
    assert [s["restored_from"] for s in stats] == ["replica", "replica"]
    assert _pid(ps.replicas[1]) != victims[1]
    assert all(s["replica"] == "ok" for s in stats)
    _same_export(ps)


def test_shard_and_replica_dead_together_without_checkpoint_is_unavailable(make_ps):
    ps = make_ps(1, optimizer=SGD(lr=-1.0), replicas=2)
    ps.register({"w": np.zeros(4, np.float32)})
    ps.push({"w": np.ones(4, np.float32)})
    pids = [_pid(ps.replicas[0]), _pid(ps.shards[0])]
    os.kill(pids[0], signal.SIGKILL)
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(ShardUnavailableError):
        ps.push({"w": np.ones(4, np.float32)})


def test_shard_and_replica_dead_together_fall_back_to_the_checkpoint(make_ps, tmp_path):
    ps = make_ps(1, optimizer=SGD(lr=-1.0), replicas=2, checkpoint_dir=tmp_path)
    ps.register({"w": np.zeros(4, np.float32)})
    ps.push({"w": np.ones(4, np.float32)})
    ps.save(tmp_path, step=1)
    ps.push({"w": np.ones(4, np.float32)})  # after the checkpoint: lost with both copies
    replica_pid = _pid(ps.replicas[0])
    os.kill(replica_pid, signal.SIGKILL)
    os.kill(_pid(ps.shards[0]), signal.SIGKILL)
    ps.push({"w": np.ones(4, np.float32)})
    np.testing.assert_array_equal(ps.pull(["w"])["w"], np.full(4, 2, np.float32))
    stats = ps.stats()[0]
    assert (stats["restored_from"], stats["restored_step"]) == ("checkpoint", 1)
    assert _pid(ps.replicas[0]) != replica_pid
    _same_export(ps)  # the restarted replica was sent the checkpoint's state


def test_pair_bundles_puts_each_replica_on_another_node():
    shards, replicas = pair_bundles(["A", "B", "A", "B"], 2, 2)
    nodes = ["A", "B", "A", "B"]
    assert sorted(shards + replicas) == [0, 1, 2, 3]
    assert all(nodes[s] != nodes[r] for s, r in zip(shards, replicas))
    assert pair_bundles(["A"] * 4, 2, 2) == ([0, 1], [2, 3])  # one node: nothing better to do
    assert pair_bundles(["A", "B"], 2, 1) == ([0, 1], [])


@pytest.mark.parametrize("kwargs", [{"replicas": 3}, {"replicas": 0}, {"replicas": True},
                                    {"replicas": 2, "max_restarts": 0}])
def test_bad_replication_arguments_are_rejected_before_ray_work(kwargs):
    with pytest.raises(ValueError, match="replicas"):
        shardps.launch(1, **kwargs)
