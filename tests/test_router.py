"""The Router on real shard actors: oracle equivalence, concurrency, bad input."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import ray

import shardps
from shardps import SGD, Adagrad, Adam, Momentum
from tests.oracle import DictServer

SHAPES = {"w": (300, 70), "b": (70,), "scalar": (), "emb": (2000, 16)}
BLOCK = 4096  # small blocks so the test model really is split over shards


def params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Momentum(lr=0.05), Adam(lr=0.01), Adagrad(lr=0.1)],
                         ids=lambda o: type(o).__name__)
def test_sharded_store_matches_single_dict_oracle(make_ps, num_shards, opt):
    ps = make_ps(num_shards, optimizer=opt, block_bytes=BLOCK)
    init = params()
    ps.register(init)
    oracle = DictServer(opt, init)
    rng = np.random.default_rng(1)
    for step in range(6):
        keys = list(SHAPES) if step % 2 == 0 else ["w", "scalar"]  # full and partial pushes
        grads = {k: rng.standard_normal(SHAPES[k]).astype(np.float32) for k in keys}
        oracle.push(grads)
        if step % 3 == 2:
            got = ps.push_pull(grads)  # one round trip: the answer includes this push
        else:
            ps.push(grads) if step % 3 else ps.push(grads, wait=False).wait()
            got = ps.pull(["w", "b"]) if step == 3 else ps.pull()
        for key, value in got.items():
            assert value.shape == SHAPES[key] and value.dtype == np.float32
            if isinstance(opt, SGD):
                np.testing.assert_array_equal(value, oracle.params[key], err_msg=key)
            else:
                np.testing.assert_allclose(value, oracle.params[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_pulled_arrays_never_change_afterwards(make_ps):
    ps = make_ps(2, block_bytes=BLOCK, optimizer=SGD(lr=1.0))
    ps.register(params())
    first = ps.pull()
    snapshot = {k: v.copy() for k, v in first.items()}
    ps.push({k: np.ones(s, np.float32) for k, s in SHAPES.items()})
    for key, value in first.items():
        np.testing.assert_array_equal(value, snapshot[key])
        if not value.flags.writeable:  # zero-copy views are read-only, so nobody can change them
            with pytest.raises(ValueError):
                value.reshape(-1)[0] = 1.0


def test_big_tensor_spreads_over_all_shards(make_ps):
    ps = make_ps(4, block_bytes=BLOCK)
    ps.register(params())
    assert {shard for shard, _, _ in ps.placement("emb")} == {0, 1, 2, 3}
    stats = ps.stats()
    assert sum(s["bytes"] for s in stats) == sum(v.nbytes for v in params().values())
    assert all(s["blocks"] >= 1 and s["keys"] >= 1 for s in stats)


@ray.remote(num_cpus=0.1)
def push_many(router, times):
    for _ in range(times):
        router.push({"w": np.ones(SHAPES["w"], np.float32), "b": np.ones(70, np.float32)})
    return True


def test_concurrent_clients_lose_nothing_and_apply_nothing_twice(make_ps, num_shards):
    ps = make_ps(num_shards, optimizer=SGD(lr=-1.0), block_bytes=BLOCK)  # lr=-1: push adds
    ps.register({"w": np.zeros(SHAPES["w"], np.float32), "b": np.zeros(70, np.float32)})
    assert all(ray.get([push_many.remote(ps, 100) for _ in range(4)]))
    got = ps.pull()
    assert (got["w"] == 400).all() and (got["b"] == 400).all()
    assert sum(s["pushes"] for s in ps.stats()) == 400 * len({s for s, _, _ in ps.placement("w") + ps.placement("b")})


def test_router_copy_has_own_client_and_does_not_own_shards(make_ps):
    ps = make_ps(2, block_bytes=BLOCK)
    ps.register(params())
    copy = pickle.loads(pickle.dumps(ps))
    assert copy._numbering.client != ps._numbering.client
    copy.shutdown()  # a copy never removes the shards
    np.testing.assert_array_equal(copy.pull(["b"])["b"], ps.pull(["b"])["b"])


def test_shutdown_removes_actors(ray_session):
    ps = shardps.launch(2)
    shard = ps.shards[0]
    ps.shutdown()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(shard.ping.remote(), timeout=30)
    ps.shutdown()  # idempotent


# ---- bad input: a clear error and nothing changes ----------------------------

BAD_PUSHES = [
    ({"w": np.ones((300, 70)), "nope": np.ones(3)}, KeyError, "nope"),
    ({"w": np.ones((70, 300))}, ValueError, "shape"),
    ({"b": np.ones(70, np.complex64)}, ValueError, "dtype"),
    ({"b": np.array(["x"] * 70)}, ValueError, "dtype"),
    ({"b": np.full(70, np.nan)}, ValueError, "NaN"),
    ({"w": np.ones((300, 70)), "b": np.r_[np.ones(69), np.inf]}, ValueError, "Inf"),
    ({"b": np.full(70, 1e300)}, ValueError, "Inf"),  # overflows float32
    ([("b", np.ones(70))], TypeError, "dict"),
]


@pytest.mark.parametrize("values, error, words", BAD_PUSHES)
def test_bad_push_raises_and_changes_nothing(make_ps, num_shards, values, error, words):
    ps = make_ps(num_shards, block_bytes=BLOCK)
    ps.register(params())
    before = ps.pull()
    with pytest.raises(error, match=words):
        ps.push(values)
    after = ps.pull()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    assert sum(s["pushes"] for s in ps.stats()) == 0


def test_large_push_with_nan_is_dropped_unsent(make_ps, num_shards):
    """Large messages are copied into the object store while the check runs: a failed check sends nothing."""
    ps = make_ps(num_shards, optimizer=SGD(lr=-1.0))
    ps.register({"big": np.zeros(200_000, np.float32), "small": np.zeros(3, np.float32)})
    bad = np.ones(200_000, np.float32)
    bad[-1] = np.nan
    with pytest.raises(ValueError, match="'big'.*NaN"):
        ps.push({"small": np.ones(3, np.float32), "big": bad})
    assert sum(s["pushes"] for s in ps.stats()) == 0
    ps.push({"small": np.ones(3, np.float32), "big": np.arange(200_000, dtype=np.float32)})
    got = ps.pull()
    np.testing.assert_array_equal(got["big"], np.arange(200_000, dtype=np.float32))
    np.testing.assert_array_equal(got["small"], np.ones(3, np.float32))


def test_nonfinite_allowed_when_asked(make_ps):
    ps = make_ps(2, block_bytes=BLOCK, allow_nonfinite=True, optimizer=SGD(lr=-1.0))
    ps.register({"b": np.zeros(4, np.float32)})
    ps.push({"b": np.array([np.nan, np.inf, 0, 1])})
    assert np.isnan(ps.pull()["b"][0]) and np.isinf(ps.pull()["b"][1])


def test_float64_gradient_cast_to_registered_float32(make_ps):
    ps = make_ps(1, optimizer=SGD(lr=1.0))
    ps.register({"b": np.zeros(3, np.float32)})
    ps.push({"b": np.array([1.0, 2.0, 3.0])})
    np.testing.assert_array_equal(ps.pull()["b"], np.array([-1, -2, -3], np.float32))


def test_pull_of_a_key_named_twice_gives_its_values(make_ps):
    ps = make_ps(2, block_bytes=BLOCK)
    ps.register(params())
    got = ps.pull(["emb", "b", "emb", "b"])  # emb is split over both shards
    assert list(got) == ["emb", "b"]
    for key in ("emb", "b"):
        np.testing.assert_array_equal(got[key], params()[key])


def test_store_used_after_shutdown_fails_at_once(ray_session):
    ps = shardps.launch(1)
    ps.register({"b": np.zeros(3, np.float32)})
    ps.shutdown()
    for call in (lambda: ps.pull(), lambda: ps.push({"b": np.ones(3, np.float32)}), ps.stats):
        with pytest.raises(shardps.ShardUnavailableError, match="shut down"):
            call()


@pytest.mark.slow
def test_two_stores_in_one_process_keep_their_ray_and_never_start_one_implicitly():
    """In a fresh process, where launch() starts Ray itself."""
    script = """
import numpy as np, ray, shardps
a = shardps.launch(1, num_cpus=1)
b = shardps.launch(1)
a.shutdown()
b.register({"w": np.zeros(2, np.float32)})
b.push({"w": np.ones(2, np.float32)})
assert ray.is_initialized()
b.shutdown()
assert not ray.is_initialized()
try:
    a.pull()
except shardps.ShardUnavailableError:
    pass
assert not ray.is_initialized()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_only_the_owner_registers(make_ps):
    ps = make_ps(2)
    ps.register({"x": np.zeros(3, np.float32)})
    copy = pickle.loads(pickle.dumps(ps))
    with pytest.raises(RuntimeError, match="only allowed on the Router that launch"):
        copy.register({"y": np.zeros(3, np.float32)})
    ps.register({"y": np.zeros(3, np.float32)})
    ps.push({"y": np.ones(3, np.float32)})
    np.testing.assert_array_equal(ps.pull(["x"])["x"], np.zeros(3, np.float32))


def test_unknown_key_in_pull_names_it(make_ps):
    ps = make_ps(2)
    ps.register({"b": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="missing"):
        ps.pull(["b", "missing"])


@pytest.mark.parametrize("values, error", [
    ({}, ValueError),
    ({"b": np.zeros(3, np.float32)}, ValueError),      # already registered
    ({"i": np.zeros(3, np.int32)}, ValueError),        # not floating point
    ({"s": np.array(["a"])}, ValueError),
    ({"e": np.zeros((0, 3), np.float32)}, ValueError),  # no elements
    ({"n": np.array([np.nan], np.float32)}, ValueError),
    ({3: np.zeros(3, np.float32)}, TypeError),
    ({"ok": np.zeros(3, np.float32), "\ud800": np.zeros(3, np.float32)}, ValueError),  # not UTF-8: no phantom key
])
def test_bad_register_raises_and_changes_nothing(make_ps, values, error):
    ps = make_ps(2)
    ps.register({"b": np.ones(3, np.float32)})
    with pytest.raises(error):
        ps.register(values)
    assert ps.keys() == ["b"]
    np.testing.assert_array_equal(ps.pull()["b"], np.ones(3, np.float32))


@pytest.mark.parametrize("kwargs", [{"num_shards": 0}, {"num_shards": 2, "block_bytes": 0},
                                    {"num_shards": 2, "optimizer": "sgd"}, {"num_shards": True},
                                    {"num_shards": 1, "block_bytes": True}, {"num_shards": 1, "max_restarts": True}])
def test_bad_launch_arguments_rejected_before_anything_starts(ray_session, kwargs):
    before = ray.util.placement_group_table()
    with pytest.raises(ValueError):
        shardps.launch(**kwargs)
    assert ray.util.placement_group_table() == before


LARGE = {"a": (800, 1000), "b": (1000,), "c": (600, 1000)}  # > 1 MiB per shard: sent without a packing copy


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adam(lr=0.01)], ids=lambda o: type(o).__name__)
def test_large_pushes_sent_as_parts_match_oracle(make_ps, num_shards, opt):
    ps = make_ps(num_shards, optimizer=opt)
    rng = np.random.default_rng(3)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in LARGE.items()}
    ps.register(init)
    assert any(isinstance(data, list) for m in ps.pack(init) if m for _, data in m[0].values())  # the path under test
    oracle = DictServer(opt, init)
    for keys in (list(LARGE), ["a", "b"], list(LARGE)):
        grads = {k: rng.standard_normal(LARGE[k]).astype(np.float32) for k in keys}
        ps.push(grads)
        oracle.push(grads)
    for key, value in ps.pull().items():
        np.testing.assert_allclose(value, oracle.params[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_message_bytes_counts_dense_data_and_table_rows():
    from shardps.store.messages import message_bytes, pack_push, row_grads
    from shardps.store.placement import HashPartitioner, Layout
    from shardps.store.tables import TableSpec

    layout = Layout(HashPartitioner(1), tables={name: TableSpec(name, 4) for name in "ab"})
    layout.add("w", (300,), np.float32)
    ids, grads = np.arange(5, dtype=np.int64), np.ones((5, 4), np.float32)
    both = pack_push(layout, {"w": np.ones(300, np.float32)}, row_grads(layout, {"a": (ids, grads), "b": (ids, grads)}))
    assert message_bytes(both[0]) == 1200 + 2 * (40 + 80)
    assert message_bytes(pack_push(layout, {}, row_grads(layout, {"a": (ids, grads)}))[0]) == 120
    assert message_bytes(None) == 0


def test_split_undoes_join():
    from shardps.store.wire import join, split

    for sizes in ([3], [3, 4], [200_000, 5, 300_000], [5] * 300, [40_000] * 3):
        parts = [np.full(n, i, np.float32) for i, n in enumerate(sizes)]
        wire = join(parts)
        for got, want in zip(split(wire, np.float32, sizes), parts):
            np.testing.assert_array_equal(got, want)
        with pytest.raises(ValueError):
            split(wire, np.float32, [*sizes[:-1], sizes[-1] + 1])


class _Restarting:
    """Stands in for an actor method whose actor Ray restarts: unavailable ``failures`` times, then it answers."""

    def __init__(self, failures: int):
        self.failures = failures

    def remote(self):
        return self


def test_wait_alive_polls_a_restart_times_out_with_timeout_error_and_waits_forever_on_none(monkeypatch):
    from ray.exceptions import ActorUnavailableError, RayActorError

    from shardps.store import handle

    def get(method, timeout=None):
        if method == "gone":
            raise RayActorError()
        if method.failures:
            method.failures -= 1
            raise ActorUnavailableError("restarting", None)

    monkeypatch.setattr(handle.ray, "get", get)
    monkeypatch.setattr(handle.time, "sleep", lambda s: None)
    handle.wait_alive(_Restarting(50), timeout=None)  # None: no deadline, however many polls
    with pytest.raises(TimeoutError, match="within 0 s"):
        handle.wait_alive(_Restarting(10**9), timeout=0)
    gone = type("Gone", (), {"remote": lambda self: "gone"})()
    with pytest.raises(shardps.ShardUnavailableError, match="gone"):
        handle.wait_alive(gone)
