"""Embedding tables on real shards: N shards vs one in-process table, restore, replicas, bad input."""
import numpy as np
import pytest
import ray

import shardps
from shardps import SGD, Adagrad, Adam
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.optim import FTRL
from shardps.store.initializers import Normal, Uniform, Zeros
from tests.conftest import kill_and_wait

DIM = 4


def _batches(seed=0, n=6, size=40, vocab=60):
    """Batches with duplicate ids, ids far apart and ids never pushed before."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids = rng.integers(-vocab // 2, vocab, size) * 10**9  # spread over the int64 range
        yield ids, rng.standard_normal((size, DIM)).astype(np.float32)


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adagrad(lr=0.1), Adam(lr=0.01), FTRL(lr=0.1, l1=0.01)],
                         ids=lambda o: type(o).__name__)
def test_sharded_table_equals_one_in_process_table(make_ps, num_shards, opt):
    ps = make_ps(num_shards)
    ps.register_table("user", DIM, initializer=Uniform(-0.1, 0.1), optimizer=opt, seed=3)
    oracle = EmbeddingTable("user", DIM, initializer=Uniform(-0.1, 0.1), optimizer=opt, seed=3)
    probe = np.arange(-40, 70) * 10**9
    for i, (ids, grads) in enumerate(_batches()):
        if i % 2:
            got = ps.table("user").push_pull(ids, grads, probe[::-1])
            oracle.push(ids, grads)
            np.testing.assert_array_equal(got, oracle.pull(probe[::-1]))
        else:
            ps.table("user").push(ids, grads)
            oracle.push(ids, grads)
    np.testing.assert_array_equal(ps.table("user").pull(probe), oracle.pull(probe))
    info = ps.tables()["user"]
    assert info["rows"] == len(oracle) == sum(info["rows_per_shard"])
    assert info["dim"] == DIM and info["bytes"] > 0


def test_rows_spread_and_initial_values_do_not_depend_on_the_shard_count(make_ps):
    ids = np.arange(3000)
    pulled = []
    for num_shards in (1, 3):
        ps = make_ps(num_shards)
        ps.register_table("item", DIM, initializer=Normal(0.1), seed=1)
        pulled.append(ps.table("item").pull(ids))
        assert ps.tables()["item"]["rows"] == 0  # a pull creates nothing
        ps.table("item").push(ids, np.zeros((len(ids), DIM), np.float32))
        per_shard = ps.tables()["item"]["rows_per_shard"]
        assert sum(per_shard) == 3000 and max(per_shard) <= 1.1 * 3000 / num_shards
    np.testing.assert_array_equal(pulled[0], pulled[1])


@pytest.mark.parametrize("restore_shards", [1, 3, 5])
def test_tables_restore_into_any_shard_count_bit_identically(make_ps, tmp_path, restore_shards):
    ps = make_ps(2)
    ps.register({"w": np.ones(5, np.float32)})
    ps.register_table("user", DIM, initializer=Uniform(), optimizer=Adam(lr=0.01), seed=2)
    ps.register_table("wide", 1, initializer=Zeros(), optimizer=FTRL(lr=0.1), max_rows=500)
    for ids, grads in _batches(1):
        ps.table("user").push(ids, grads)
        ps.table("wide").push(ids, grads[:, :1])
    ps.save(tmp_path)
    restored = shardps.restore(tmp_path, num_shards=restore_shards)
    try:
        probe = np.arange(-40, 70) * 10**9
        for name in ("user", "wide"):
            np.testing.assert_array_equal(restored.table(name).pull(probe), ps.table(name).pull(probe))
            assert restored.tables()[name]["rows"] == ps.tables()[name]["rows"]
        ids, grads = next(_batches(7))  # and the optimizer state came along: one more push agrees
        for store in (ps, restored):
            store.table("user").push(ids, grads)
        np.testing.assert_array_equal(restored.table("user").pull(probe), ps.table("user").pull(probe))
        np.testing.assert_array_equal(restored.pull(["w"])["w"], np.ones(5, np.float32))
    finally:
        restored.shutdown()


def test_replicated_table_loses_no_acknowledged_row_push(make_ps):
    ps = make_ps(2, replicas=2, max_restarts=4)
    ps.register_table("t", 2, initializer=Zeros(), optimizer=SGD(lr=-1.0))  # a push adds
    ids = np.arange(200)
    ones = np.ones((200, 2), np.float32)
    pending = []
    for i in range(30):
        if i in (10, 20):
            kill_and_wait(ps.shards[0] if i == 10 else ps.replicas[1])
        pending.append(ps.table("t").push(ids, ones, wait=False))
        while len(pending) > 2:
            pending.pop(0).wait(timeout=120)
    for handle in pending:
        handle.wait(timeout=120)
    np.testing.assert_array_equal(ps.table("t").pull(ids), np.full((200, 2), 30, np.float32))
    assert ps.stats()[0]["restored_from"] == "replica"


def test_restarted_shard_reloads_its_rows_from_the_checkpoint(make_ps, tmp_path):
    ps = make_ps(2, checkpoint_dir=tmp_path, max_restarts=1)
    ps.register_table("t", 2, initializer=Zeros(), optimizer=SGD(lr=-1.0))
    ids = np.arange(100)
    ps.table("t").push(ids, np.ones((100, 2), np.float32))
    ps.save(tmp_path)
    ps.table("t").push(ids, np.ones((100, 2), np.float32))  # lost on shard 0 when it dies
    kill_and_wait(ps.shards[0])
    rows = ps.table("t").pull(ids)[:, 0]
    on_0 = shardps.store.placement.shard_of_ids(ids, "t", 2) == 0
    assert (rows[on_0] == 1).all() and (rows[~on_0] == 2).all()


@ray.remote(num_cpus=0.1)
def _push_from_a_task(router):
    router.table("t").push(np.array([1, 1, 2]), np.ones((3, 2), np.float32))
    return router.table("t").pull(np.array([1, 2]))


def test_router_copies_in_tasks_push_and_pull_rows(make_ps):
    ps = make_ps(2)
    ps.register_table("t", 2, initializer=Zeros(), optimizer=SGD(lr=-1.0))
    np.testing.assert_array_equal(ray.get(_push_from_a_task.remote(ps)), [[2, 2], [1, 1]])
    np.testing.assert_array_equal(ps.table("t").pull([2, 1]), [[1, 1], [2, 2]])


@pytest.mark.parametrize("call, error", [
    (lambda ps: ps.table("nope").pull([1]), KeyError),
    (lambda ps: ps.table("t").pull([1.5]), TypeError),
    (lambda ps: ps.table("t").pull(np.array(["1"])), TypeError),
    (lambda ps: ps.table("t").pull([True]), TypeError),
    (lambda ps: ps.table("t").pull([[1]]), ValueError),
    (lambda ps: ps.table("t").pull(np.array([2**63], np.uint64)), ValueError),
    (lambda ps: ps.table("t").push([1, 2], np.ones((1, 2))), ValueError),
    (lambda ps: ps.table("t").push([1], np.array([[np.nan, 1]])), ValueError),
    (lambda ps: ps.table("t").push([1], np.array([[1j, 1]])), ValueError),
    (lambda ps: ps.push({"w": np.ones(3)}, rows={"t": ([1], np.array([[np.inf, 1]]))}), ValueError),
    (lambda ps: ps.push({"w": np.ones(3)}, rows={"nope": ([1], np.ones((1, 2)))}), KeyError),
    (lambda ps: ps.push({"w": np.ones(3)}, rows={"t": [1]}), TypeError),
    (lambda ps: ps.register_table("t", 2), ValueError),  # exists
    (lambda ps: ps.register_table("w", 2), ValueError),  # a dense key's name
    (lambda ps: ps.register_table("u", 0), ValueError),
    (lambda ps: ps.register_table("u", 2, initializer="glorot"), ValueError),
    (lambda ps: ps.register_table("u", 2, max_rows=0), ValueError),
    (lambda ps: ps.register_table("u", 2, optimizer=shardps.Momentum()), ValueError),
])
def test_bad_table_calls_raise_and_change_nothing(make_ps, call, error):
    ps = make_ps(2)
    ps.register({"w": np.zeros(3, np.float32)})
    ps.register_table("t", 2, initializer=Zeros(), optimizer=SGD(lr=-1.0))
    ps.table("t").push([1], np.ones((1, 2), np.float32))
    with pytest.raises(error):
        call(ps)
    assert set(ps.tables()) == {"t"} and ps.tables()["t"]["rows"] == 1
    np.testing.assert_array_equal(ps.table("t").pull([1, 2]), [[1, 1], [0, 0]])
    np.testing.assert_array_equal(ps.pull(["w"])["w"], np.zeros(3))


def test_dense_keys_and_rows_travel_in_one_message_per_shard(make_ps):
    ps = make_ps(3, optimizer=SGD(lr=-1.0))  # a push adds
    ps.register({"w": np.zeros(5, np.float32), "b": np.zeros(2, np.float32)})
    for name in ("emb", "wide"):
        ps.register_table(name, 2, initializer=Zeros(), optimizer=SGD(lr=-1.0))
    ids = np.array([5, 7, 5, 1000, 7])
    grads = np.arange(10, dtype=np.float32).reshape(5, 2)
    ps.push({"w": np.ones(5), "b": np.ones(2)}, rows={"emb": (ids, grads), "wide": (ids[:1], grads[:1])})
    before = sum(s["pushes"] for s in ps.stats())
    got = ps.pull(["w"], rows={"emb": [1000, 5, 5, 9], "wide": [5]})
    assert sum(s["pulls"] for s in ps.stats()) <= 3 and sum(s["pushes"] for s in ps.stats()) == before
    np.testing.assert_array_equal(got["w"], np.ones(5))
    np.testing.assert_array_equal(got["emb"], [[6, 7], [4, 6], [4, 6], [0, 0]])  # 5: rows 0 + 2 summed
    np.testing.assert_array_equal(got["wide"], [[0, 1]])
    np.testing.assert_array_equal(got["emb"], ps.table("emb").pull([1000, 5, 5, 9]))
    assert set(got) == {"w", "emb", "wide"}


def test_small_rows_travel_as_bytes_large_as_arrays_and_both_match_the_oracle(make_ps):
    from shardps.store.wire import INLINE_BYTES

    dim = 32
    ps = make_ps(2, optimizer=SGD(lr=-1.0))
    ps.register({"w": np.zeros(4, np.float32), "v": np.zeros(4, np.float32)})
    ps.register_table("t", dim, initializer=Uniform(-0.1, 0.1), optimizer=Adagrad(lr=0.1), seed=2)
    oracle = EmbeddingTable("t", dim, initializer=Uniform(-0.1, 0.1), optimizer=Adagrad(lr=0.1), seed=2)
    rng = np.random.default_rng(4)
    big = 4 * INLINE_BYTES // (dim * 4)  # rows per push: ~2x the inline limit on each of 2 shards
    for size in (3, big, 5, big):
        ids = rng.integers(0, 3 * big, size)
        grads = rng.standard_normal((size, dim)).astype(np.float32)
        wire = [m[1]["t"] for m in ps.pack({"w": np.ones(4)}, rows={"t": (ids, grads)}) if m and "t" in m[1]]
        assert wire and all(isinstance(grads, bytes) == (size < big) for _, grads in wire)  # ids: bytes either way
        got = ps.push_pull({"w": np.ones(4)}, ["w"], rows={"t": (ids, grads)}, pull_rows={"t": ids[::-1]})
        oracle.push(ids, grads)
        np.testing.assert_array_equal(got["t"], oracle.pull(ids[::-1]))
    probe = np.arange(3 * big)
    np.testing.assert_array_equal(ps.table("t").pull(probe), oracle.pull(probe))
    np.testing.assert_array_equal(ps.pull(["w"])["w"], np.full(4, 4.0))


def test_push_mean_pull_answers_each_workers_next_pull_after_the_update_once(make_ps, num_shards):
    """Sync training's one call per shard: the workers' mean update, then each worker's own pull; a re-sent
    step is not applied twice. Oracle: the same store shape doing push_mean, then the pulls."""
    stores = [make_ps(num_shards, optimizer=SGD(lr=0.5)) for _ in range(2)]
    for ps in stores:
        ps.register({"w": np.arange(6, dtype=np.float32), "b": np.ones(3, np.float32)})
        ps.register_table("t", DIM, initializer=Uniform(-0.1, 0.1), optimizer=Adagrad(lr=0.1), seed=5)
    fused, oracle = stores
    batches = list(_batches(seed=7, n=4))
    for step in range(1, 3):
        grads = [({"w": np.full(6, w + step, np.float32), "b": np.full(3, -1.0, np.float32)},
                  {"t": batches[2 * (step - 1) + w]}) for w in range(2)]
        next_ids = [batches[(2 * step + w) % 4][0][::-1] for w in range(2)]  # duplicates, any order
        plans = [fused.pull_requests(["w", "b"], rows={"t": ids}) for ids in next_ids]
        packed = [fused.pack(dense, rows) for dense, rows in grads]
        pairs = [[(packed[w][s], plans[w].requests[s]) for w in range(2)] for s in range(num_shards)]
        answers = fused.push_mean_pull(pairs, step=step)
        assert fused.push_mean_pull(pairs, step=step)  # the same step again: answered, not applied
        oracle.push_mean([[oracle.pack(dense, rows)[s] for dense, rows in grads] for s in range(num_shards)], step=step)
        for w in range(2):
            got, want = fused.pulled(plans[w], answers[w]), oracle.pull(["w", "b"], rows={"t": next_ids[w]})
            assert set(got) == set(want) == {"w", "b", "t"}
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    probe = np.concatenate([ids for ids, _ in batches])
    np.testing.assert_array_equal(fused.table("t").pull(probe), oracle.table("t").pull(probe))
    assert [s["pushes"] for s in fused.stats()] == [s["pushes"] for s in oracle.stats()]
