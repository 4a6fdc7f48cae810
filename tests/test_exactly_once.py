"""Exactly-once pushes through shard restarts, pipelining, reordered waits and threads.

Every store here uses ``SGD(lr=-1)`` (a push adds) and pushes ones, so each
element of a key ends equal to the number of pushes applied to it: the
oracle is the count of pushes whose ``wait()`` returned.
Kills are SIGKILLs of a shard's process, taken from ``stats()`` (the shards
answer between pushes); each waits for the previous recovery to finish.
"""
import os
import signal
import threading

import numpy as np
import pytest
import ray

from shardps import SGD
from tests.conftest import kill_and_wait

SIZE = 20_000  # float32: split over both shards at this block size
BLOCK = 16 * 1024
ONES = {"w": np.ones(SIZE, np.float32)}


@pytest.fixture
def store(make_ps):
    ps = make_ps(2, optimizer=SGD(lr=-1.0), replicas=2, max_restarts=8, block_bytes=BLOCK)
    ps.register({"w": np.zeros(SIZE, np.float32)})
    assert {shard for shard, _, _ in ps.placement("w")} == {0, 1}
    return ps


def _pipelined(ps, pushes: int, kill_at: dict[int, object], inflight: int = 2) -> None:
    """The async trainer's pattern: at most ``inflight`` pushes unacknowledged; kills at given push counts."""
    pending = []
    for i in range(pushes):
        if i in kill_at:
            os.kill(ray.get(kill_at[i].stats.remote())["pid"], signal.SIGKILL)  # pushes still in flight
        pending.append(ps.push(ONES, wait=False))
        while len(pending) > inflight:
            pending.pop(0).wait()
    for handle in pending:
        handle.wait()


def test_pipelined_pushes_survive_two_kills_of_a_replicated_shard(store):
    _pipelined(store, 60, {15: store.shards[0], 40: store.shards[0]})
    w = store.pull(["w"])["w"]
    assert (w == 60).all(), np.unique(w, return_counts=True)
    assert store.stats()[0]["restored_from"] == "replica"


def test_handles_waited_in_reverse_order_after_a_kill_all_apply(store):
    handles = [store.push(ONES, wait=False) for _ in range(3)]
    os.kill(ray.get(store.shards[0].stats.remote())["pid"], signal.SIGKILL)
    handles += [store.push(ONES, wait=False) for _ in range(7)]
    for handle in reversed(handles):
        handle.wait(timeout=120)
    w = store.pull(["w"])["w"]
    assert (w == 10).all(), np.unique(w, return_counts=True)


def test_threads_sharing_one_router_lose_nothing(make_ps):
    ps = make_ps(2, optimizer=SGD(lr=-1.0), block_bytes=BLOCK)
    ps.register({"w": np.zeros(SIZE, np.float32)})
    start = threading.Barrier(4)

    def pusher():
        start.wait()
        handles = [ps.push(ONES, wait=False) for _ in range(100)]
        for handle in handles[::-1]:
            handle.wait()

    threads = [threading.Thread(target=pusher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = ps.pull(["w"])["w"]
    assert (w == 400).all(), np.unique(w, return_counts=True)


@ray.remote(num_cpus=0.1)
def _task_client(router, pushes: int, seed: int) -> int:
    """A Ray task pushing through its own Router copy; waits in a shuffled order. Returns pushes acknowledged."""
    rng = np.random.default_rng(seed)
    acked, batch = 0, []
    for _ in range(pushes):
        batch.append(router.push(ONES, wait=False))
        if len(batch) == 4:
            for i in rng.permutation(4):
                batch[i].wait(timeout=120)
            acked, batch = acked + 4, []
    for handle in batch:
        handle.wait(timeout=120)
    return acked + len(batch)


def test_exactly_once_under_threads_tasks_pipelining_and_repeated_kills(store):
    """Stress: 2 blocking threads, 1 pipelined thread, 2 Ray tasks with shuffled waits; meanwhile a shard,
    a replica, the other shard and the other replica are SIGKILLed in turn, each once the clients have
    pushed 20 more times. Every element equals the number of acknowledged pushes."""
    acked, errors, stop = [0], [], threading.Event()
    progress = threading.Condition()

    def count():
        with progress:
            acked[0] += 1
            progress.notify_all()

    def pushed_more(n):
        """Block until ``n`` more pushes were acknowledged (or a client failed)."""
        with progress:
            target = acked[0] + n
            assert progress.wait_for(lambda: acked[0] >= target or errors, timeout=300), acked

    def client(window: int):
        try:
            pending = []
            while not stop.is_set():
                pending.append(store.push(ONES, wait=False))
                if len(pending) > window:
                    pending.pop(0).wait(timeout=120)
                    count()
            for handle in pending:
                handle.wait(timeout=120)
                count()
        except Exception as exc:  # reported below: the test must fail, not hang
            errors.append(exc)

    tasks = [_task_client.remote(store, 40, seed) for seed in range(2)]
    threads = [threading.Thread(target=client, args=(window,)) for window in (0, 0, 3)]
    for t in threads:
        t.start()
    try:
        for victim in [store.shards[0], store.replicas[1], store.shards[1], store.replicas[0]]:
            pushed_more(20)
            resyncs = [s["resyncs"] for s in store.stats()]
            kill_and_wait(victim)
            if victim in store.replicas:  # a restarted replica is blank until its shard's next push resyncs it
                pushed_more(5)
                shard = store.replicas.index(victim)
                assert store.stats()[shard]["resyncs"] > resyncs[shard]
        pushed_more(10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=600)
    task_acked = sum(ray.get(tasks, timeout=600))
    assert not errors, errors
    assert task_acked == 80
    w = store.pull(["w"])["w"]
    assert (w == acked[0] + task_acked).all(), (acked[0] + task_acked, np.unique(w, return_counts=True))
    assert [s["restored_from"] for s in store.stats()] == ["replica", "replica"]
