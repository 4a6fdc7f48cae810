"""One embedding table on one shard (no Ray) against a per-id dict oracle."""
import numpy as np
import pytest

from shardps import SGD, Adagrad, Adam, Momentum
from shardps.store.shard.rows import EmbeddingTable
from shardps.store.optim import FTRL
from shardps.store.initializers import Normal, Uniform, Zeros


class RowOracle:
    """Per id, in Python: duplicates summed, lazy per-row steps, admission by count, LRU eviction."""

    def __init__(self, table: EmbeddingTable):
        self.t, self.rows, self.state, self.steps, self.seen, self.counts, self.clock = table, {}, {}, {}, {}, {}, 0

    def init(self, i):
        return self.t.initializer.rows(np.array([i]), self.t.dim, name=self.t.name, seed=self.t.seed)[0]

    def pull(self, ids):
        return np.stack([self.rows[i] if i in self.rows else self.init(i) for i in ids])

    def push(self, ids, grads):
        summed = {}
        for i, g in zip(ids.tolist(), grads):
            summed[i] = summed.get(i, 0) + g.astype(np.float64)
        for i, g in summed.items():
            if i not in self.rows:
                self.counts[i] = self.counts.get(i, 0) + 1
                if self.counts[i] < self.t.min_count:
                    continue
                if self.t.max_rows is not None and len(self.rows) >= self.t.max_rows:
                    victim = min((k for k in self.rows if k not in summed), key=self.seen.get)
                    for d in (self.rows, self.state, self.steps, self.seen):
                        d.pop(victim)
                self.rows[i], self.steps[i] = self.init(i), 0
                self.state[i] = {s: np.zeros(self.t.dim, np.float32) for s in self.t.optimizer.slots()}
            row = self.rows[i]
            self.t.optimizer.apply(row, g.astype(np.float32), self.state[i], self.steps[i])
            self.steps[i] += 1
            self.seen[i] = self.clock
        self.clock += 1


OPTIMIZERS = [SGD(lr=0.1), Adagrad(lr=0.1), Adam(lr=0.01), FTRL(lr=0.1, l1=0.01)]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=lambda o: type(o).__name__)
def test_table_matches_per_row_oracle_with_duplicate_ids_and_lazy_steps(opt):
    table = EmbeddingTable("user", 4, initializer=Uniform(-0.1, 0.1), optimizer=opt, seed=1)
    oracle, rng = RowOracle(table), np.random.default_rng(0)
    for _ in range(12):
        ids = rng.integers(-5, 15, 25)  # duplicates in every batch; some ids updated far more than others
        grads = rng.standard_normal((25, 4)).astype(np.float32)
        table.push(ids, grads)
        oracle.push(ids, grads)
    probe = np.arange(-8, 20)  # includes ids never pushed
    np.testing.assert_allclose(table.pull(probe), oracle.pull(probe), rtol=2e-5, atol=1e-6)
    assert len(table) == len(oracle.rows)


def test_pull_never_creates_a_row_and_answers_the_initial_value():
    table = EmbeddingTable("item", 3, initializer=Normal(0.1), optimizer=SGD(lr=0.1))
    ids = np.array([4, 2**40, -7])
    first = table.pull(ids)
    assert len(table) == 0
    np.testing.assert_array_equal(first, Normal(0.1).rows(ids, 3, name="item", seed=0))
    table.push(ids[:1], np.ones((1, 3), np.float32))
    assert len(table) == 1
    np.testing.assert_allclose(table.pull(ids[:1]), first[:1] - 0.1, rtol=1e-6)


def test_admission_drops_gradients_until_the_kth_push():
    table = EmbeddingTable("t", 2, initializer=Zeros(), optimizer=SGD(lr=1.0), min_count=3)
    oracle = RowOracle(table)
    for step in range(4):
        ids, grads = np.array([7, 7, 9]), np.ones((3, 2), np.float32)  # 7 twice per push: counts once
        table.push(ids, grads)
        oracle.push(ids, grads)
        assert len(table) == (0 if step < 2 else 2)
    np.testing.assert_array_equal(table.pull([7, 9]), oracle.pull([7, 9]))
    np.testing.assert_array_equal(table.pull([7, 9]), [[-4, -4], [-2, -2]])  # pushes 3 and 4 applied


def test_eviction_removes_least_recently_updated_rows_and_they_come_back_fresh():
    table = EmbeddingTable("t", 2, initializer=Uniform(), optimizer=Adagrad(lr=0.5), max_rows=3)
    oracle = RowOracle(table)
    for i in [1, 2, 3, 1, 4, 5, 2, 1, 6]:  # one id per push: a strict recency order
        ids, grads = np.array([i]), np.full((1, 2), float(i), np.float32)
        table.push(ids, grads)
        oracle.push(ids, grads)
        assert len(table) == len(oracle.rows) <= 3
    probe = np.arange(1, 7)
    np.testing.assert_allclose(table.pull(probe), oracle.pull(probe), rtol=1e-6)
    assert sorted(oracle.rows) == [1, 2, 6]


def test_bytes_per_row_stay_close_to_the_raw_row():
    table = EmbeddingTable("t", 16, initializer=Zeros(), optimizer=Adagrad(lr=0.1))
    ids = np.arange(100_000) * 7919
    table.push(ids, np.ones((len(ids), 16), np.float32))
    raw = 16 * 4 * 2  # row + Adagrad accumulator
    assert table.nbytes / len(table) <= raw + 8 + 12 / 0.4 + 0.1  # + two int32 counters + 12-byte cells >= 40 % full


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"min_count": 0}, {"max_rows": 0}, {"min_count": 300},
                                    {"optimizer": Momentum()}])
def test_bad_table_arguments_rejected(kwargs):
    args = {"dim": 4, "initializer": Zeros(), "optimizer": SGD(), **kwargs}
    with pytest.raises(ValueError):
        EmbeddingTable("t", args.pop("dim"), **args)


def test_bad_push_changes_nothing():
    table = EmbeddingTable("t", 2, initializer=Zeros(), optimizer=SGD(lr=1.0))
    table.push([1], np.ones((1, 2), np.float32))
    for ids, grads in [([1, 2], np.ones((1, 2))), ([1], np.full((1, 2), np.nan)), ([1.5], np.ones((1, 2)))]:
        with pytest.raises((ValueError, TypeError)):
            table.push(ids, grads)
    assert len(table) == 1
    np.testing.assert_array_equal(table.pull([1]), [[-1, -1]])


def test_update_times_are_renumbered_before_they_overflow():
    table = EmbeddingTable("t", 2, initializer=Zeros(), optimizer=SGD(lr=1.0), max_rows=3)
    for i in (1, 2, 3):
        table.push([i], np.ones((1, 2), np.float32))
    table._clock = np.iinfo(np.int32).max - 1  # as after ~2**31 pushes
    table.push([2], np.ones((1, 2), np.float32))  # 2 is now the newest; the clock wraps here
    assert table._clock < 10
    table.push([4], np.ones((1, 2), np.float32))  # evicts the least recently updated: 1
    table.push([5], np.ones((1, 2), np.float32))  # then 3
    np.testing.assert_array_equal(table.pull([1, 2, 3])[:, 0], [0, -2, 0])
