"""Fuzzing the public API: only documented exceptions come out, and a rejected call changes nothing."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardps

SHAPES = {"w": (4, 3), "b": (3,), "s": ()}
DOCUMENTED = (KeyError, ValueError, TypeError)


@pytest.fixture(scope="module")
def store(ray_session):
    ps = shardps.launch(2, optimizer=shardps.SGD(lr=-1.0), block_bytes=16)  # lr=-1: a push adds
    ps.register({k: np.zeros(s, np.float32) for k, s in SHAPES.items()})
    yield ps
    ps.shutdown()


dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_, np.complex64,
                          np.str_, object])
shapes = st.one_of(st.sampled_from(list(SHAPES.values())),
                   st.lists(st.integers(0, 4), min_size=0, max_size=40).map(tuple))
special = st.sampled_from([0.0, 1.0, -2.5, np.nan, np.inf, -np.inf, 1e300])


@st.composite
def values(draw):
    kind = draw(st.sampled_from(["array", "array", "array", "none", "str", "list", "dict"]))
    if kind == "none":
        return None
    if kind == "str":
        return draw(st.text(max_size=5))
    if kind == "list":
        return draw(st.lists(st.one_of(st.floats(allow_nan=True), st.text(max_size=2)), max_size=4))
    if kind == "dict":
        return {"x": 1}
    shape, dtype = draw(shapes), draw(dtypes)
    if np.prod(shape, dtype=np.int64) > 10_000:
        shape = (2,) * 13  # huge rank, small size
    fill = draw(special)
    try:
        with np.errstate(all="ignore"):
            return np.full(shape, fill).astype(dtype)
    except (ValueError, OverflowError):
        return np.zeros(shape, dtype)


keys = st.one_of(st.sampled_from(list(SHAPES)), st.text(max_size=4), st.integers(), st.none())


def _snapshot(ps):
    return {k: v.copy() for k, v in ps.pull().items()}


def _valid(update):
    for key, value in update.items():
        if key not in SHAPES:
            return False
        arr = np.asarray(value) if isinstance(value, np.ndarray) else None
        if arr is None or arr.shape != SHAPES[key] or arr.dtype.kind not in "biuf":
            return False
        if not np.can_cast(arr.dtype, np.float32, "same_kind"):
            return False
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf: rejected
            if not np.isfinite(arr.astype(np.float32)).all():
                return False
    return True


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(update=st.dictionaries(keys, values(), max_size=4))
def test_push_accepts_exactly_the_valid_updates(store, update):
    before = _snapshot(store)
    try:
        with np.errstate(all="ignore"):
            store.push(update)
    except DOCUMENTED:
        assert not _valid(update) or not update
        after = _snapshot(store)
        for key in SHAPES:
            np.testing.assert_array_equal(after[key], before[key])
        return
    assert _valid(update)
    after = _snapshot(store)
    for key in SHAPES:
        expected = before[key] + (np.asarray(update[key]).astype(np.float32) if key in update else 0)
        np.testing.assert_array_equal(after[key], expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.one_of(st.lists(keys, max_size=4), keys))
def test_pull_returns_requested_keys_or_raises_documented_error(store, names):
    before = _snapshot(store)
    try:
        got = store.pull(names)
    except DOCUMENTED:
        pass
    else:
        wanted = list(SHAPES) if names is None else [names] if isinstance(names, str) else list(names)
        assert set(got) == set(wanted) <= set(SHAPES)
    after = _snapshot(store)
    for key in SHAPES:
        np.testing.assert_array_equal(after[key], before[key])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(update=st.dictionaries(keys, values(), max_size=3))
def test_bad_register_raises_documented_error_and_adds_nothing(store, update):
    if update and all(isinstance(k, str) and k and k not in store.keys() for k in update) and all(
            _registrable(v) for v in update.values()):
        return  # a valid registration: covered elsewhere; keep this store's keys fixed
    before_keys = store.keys()
    with pytest.raises(DOCUMENTED):
        store.register(update)
    assert store.keys() == before_keys


def _registrable(value) -> bool:
    """Would register() accept this value (array-like of finite floats with elements)?"""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        return False
    return arr.dtype.kind == "f" and arr.size > 0 and bool(np.isfinite(arr).all())


# ---- embedding tables ------------------------------------------------------
TABLE_DIM = 3


@pytest.fixture(scope="module")
def table_store(ray_session):
    """A 2-shard table and the same table in process (the oracle), fed the same accepted pushes."""
    from shardps.store.shard.rows import EmbeddingTable

    ps = shardps.launch(2, optimizer=shardps.SGD(lr=-1.0))
    ps.register_table("t", TABLE_DIM, initializer=shardps.Uniform(-1, 1), optimizer=shardps.Adagrad(lr=0.1))
    oracle = EmbeddingTable("t", TABLE_DIM, initializer=shardps.Uniform(-1, 1), optimizer=shardps.Adagrad(lr=0.1))
    yield ps, oracle
    ps.shutdown()


id_values = st.one_of(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6).map(lambda v: np.array(v, np.int64)),
    st.lists(st.integers(0, 2**64 - 1), max_size=3).map(lambda v: np.array(v, np.uint64)),
    st.lists(st.integers(-5, 5), max_size=6).map(lambda v: np.array(v, np.int32)),
    values(),
)
PROBE = np.array([-(2**63), -1, 0, 1, 2, 5, 2**62, 2**63 - 1], np.int64)


def _valid_rows(ids, grads) -> bool:
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu" or ids.dtype == np.bool_ or ids.ndim != 1:
        return False
    if ids.dtype == np.uint64 and ids.size and ids.max() > 2**63 - 1:
        return False
    if not isinstance(grads, np.ndarray) or grads.shape != (len(ids), TABLE_DIM) or grads.dtype.kind not in "biuf":
        return False
    if not np.can_cast(grads.dtype, np.float32, "same_kind"):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(grads.astype(np.float32)).all())


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=id_values, fitting=st.booleans(), other=values(), fill=special)
def test_push_rows_accepts_exactly_the_valid_pushes_and_matches_the_oracle(table_store, ids, fitting, other, fill):
    ps, oracle = table_store
    rows = len(ids) if isinstance(ids, np.ndarray) and ids.ndim == 1 else 2
    grads = np.full((rows, TABLE_DIM), fill, np.float64) if fitting else other  # half the time the right shape
    before = ps.table("t").pull(PROBE)
    try:
        with np.errstate(all="ignore"):
            ps.table("t").push(ids, grads)
    except DOCUMENTED:
        assert not _valid_rows(ids, grads)
        np.testing.assert_array_equal(ps.table("t").pull(PROBE), before)
        return
    assert _valid_rows(ids, grads)
    oracle.push(ids, grads.astype(np.float32))
    np.testing.assert_array_equal(ps.table("t").pull(PROBE), oracle.pull(PROBE))
    if len(ids):
        np.testing.assert_array_equal(ps.table("t").pull(ids), oracle.pull(ids))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.one_of(st.text(max_size=3), st.lists(st.integers(), max_size=3), st.integers(), st.just(()),
                      st.dictionaries(st.one_of(st.just("t"), st.text(max_size=2), st.integers()), values(),
                                      min_size=1, max_size=2)))
def test_rows_argument_gets_documented_errors_and_changes_nothing(table_store, rows):
    """``rows=`` must map tables to (ids, grads) pairs (push) or ids (pull); anything else is refused."""
    ps, _ = table_store
    before = ps.table("t").pull(PROBE)
    with pytest.raises(DOCUMENTED):
        ps.push({}, rows=rows)  # never a mapping of (ids, grads) pairs: values() makes no tuples
    np.testing.assert_array_equal(ps.table("t").pull(PROBE), before)
    try:
        got = ps.pull([], rows=rows)
    except DOCUMENTED:
        pass
    else:  # a mapping of "t" to 1-D integer ids
        assert list(got) == ["t"] and got["t"].shape == (len(rows["t"]), TABLE_DIM)
    np.testing.assert_array_equal(ps.table("t").pull(PROBE), before)


table_args = st.fixed_dictionaries({
    "name": st.one_of(st.text(max_size=3), st.integers(), st.none(), st.just("t")),
    "dim": st.one_of(st.integers(-2, 5), st.just(2**40), st.floats(0, 3), st.text(max_size=1)),
}, optional={
    "initializer": st.sampled_from([None, shardps.Zeros(), shardps.Uniform(-1, 1), "uniform", 3]),
    "optimizer": st.sampled_from([None, shardps.Adagrad(lr=0.1), shardps.FTRL(lr=0.1), "adam",
                                  shardps.Momentum(lr=0.1), shardps.SGD]),
    "dtype": st.sampled_from([np.float32, np.float64, np.int8, "nope", None]),
    "min_count": st.one_of(st.integers(-1, 300), st.just(True)),
    "max_rows": st.one_of(st.none(), st.integers(-1, 5), st.just(2.5)),
    "seed": st.one_of(st.integers(-2, 3), st.just("s")),
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=table_args)
def test_register_table_gets_documented_errors_or_a_table_of_that_dim(table_store, args):
    ps, _ = table_store
    before = ps.tables()
    try:
        table = ps.register_table(**args)
    except DOCUMENTED:
        assert ps.tables() == before  # nothing registered anywhere
        return
    assert args["name"] not in before and table.stats()["dim"] == args["dim"]
    assert table.pull(np.array([7])).shape == (1, args["dim"])


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=False),
                                     st.text(max_size=3)),
                           lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner,
                                                                                      max_size=2), max_leaves=4)
TABLE_FIELDS = ["name", "dim", "dtype", "initializer", "optimizer", "seed", "min_count", "max_rows", "rows",
                "count_slots"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(TABLE_FIELDS), value=json_values, drop=st.booleans())
def test_a_mangled_table_manifest_entry_reads_back_whole_or_raises_value_error(tmp_path_factory, field, value, drop):
    """No other exception, no allocation beyond the file; what reads back is a table the shards can load."""
    from shardps.store import checkpoint
    from shardps.store.tables import TableSpec
    from tests.ckpt import edit_manifest, write

    folder = write(tmp_path_factory.mktemp("ckpt"))
    edit_manifest(folder, lambda m: m["tables"][0].pop(field) if drop else m["tables"][0].update({field: value}))
    try:
        saved = checkpoint.read(folder)
    except ValueError:
        return
    entry = saved.manifest["tables"][0]
    spec = TableSpec.from_json(entry)
    rows = saved.tables[spec.name]
    assert rows["params"].shape == (entry["rows"], spec.dim) and len(np.unique(rows["ids"])) == entry["rows"]
