"""Update rules against the per-key oracle, and their argument checks (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adagrad, Adam, Momentum
from shardps.optim import FTRL
from shardps.optim import optimizer_config, optimizer_from_config
from tests.oracle import DictServer

ALL = [SGD(lr=0.1), Momentum(lr=0.1, momentum=0.9), Adam(lr=0.01), Adagrad(lr=0.1),
       FTRL(lr=0.1, l1=0.05, l2=0.01, beta=0.5)]


@pytest.mark.parametrize("opt", ALL, ids=lambda o: type(o).__name__)
def test_apply_matches_oracle_over_steps(opt):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(50)
    oracle = DictServer(opt, {"p": p})
    state = {s: np.zeros_like(p) for s in opt.slots()}
    for step in range(5):
        g = rng.standard_normal(50)
        opt.apply(p, g, state, step)
        oracle.push({"p": g})
    np.testing.assert_allclose(p, oracle.params["p"], rtol=1e-10)


@pytest.mark.parametrize("opt", ALL, ids=lambda o: type(o).__name__)
def test_config_roundtrip(opt):
    assert optimizer_from_config(optimizer_config(opt)) == opt


@pytest.mark.parametrize("make", [lambda: SGD(lr=float("nan")), lambda: SGD(lr=0), lambda: Adam(lr=-1),
                                  lambda: Momentum(momentum=1.5), lambda: Adagrad(eps=0),
                                  lambda: optimizer_from_config({"name": "rmsprop"}), lambda: FTRL(l1=-1.0)])
def test_bad_hyperparameters_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_adam_with_a_step_per_row_equals_each_row_alone():
    """Lazy Adam on embedding rows: each row's bias correction uses its own step count."""
    rng = np.random.default_rng(2)
    opt, rows, grads = Adam(lr=0.01), rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    steps = np.array([[0], [4], [9]])
    state = {"m": rng.random((3, 4)), "v": rng.random((3, 4))}
    alone = [(rows[i].copy(), {k: v[i].copy() for k, v in state.items()}) for i in range(3)]
    opt.apply(rows, grads, state, steps)
    for i, (row, row_state) in enumerate(alone):
        opt.apply(row, grads[i], row_state, int(steps[i, 0]))
        np.testing.assert_allclose(rows[i], row, rtol=1e-12)
