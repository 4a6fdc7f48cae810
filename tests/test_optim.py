"""Update rules against the per-key oracle, and their argument checks (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adagrad, Adam, Momentum
from shardps.store.optim import FTRL
from shardps.store.optim import optimizer_config, optimizer_from_config
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


def _ftrl_as_expressions(opt, param, grad, state):
    """FTRL written as plain numpy expressions (a temporary per term): what the scratch version must equal."""
    z, sum_sq = state["z"], state["sum_sq"]
    n = opt.initial_accumulator + sum_sq
    g2 = np.square(grad)
    z += grad - (np.sqrt(n + g2) - np.sqrt(n)) / opt.lr * param
    sum_sq += g2
    n += g2
    denom = (opt.beta + np.sqrt(n)) / opt.lr + 2 * opt.l2
    param[...] = np.where(np.abs(z) <= opt.l1, 0.0, (np.sign(z) * opt.l1 - z) / denom)


@pytest.mark.parametrize("shape", [(1000,), (37, 16)])  # a dense chunk; embedding rows
def test_ftrl_in_scratch_arrays_equals_the_plain_expressions_bit_for_bit(shape):
    rng = np.random.default_rng(3)
    opt = FTRL(lr=0.1, l1=0.05, l2=0.01, beta=0.5)
    param = rng.standard_normal(shape).astype(np.float32)
    state = {s: np.zeros(shape, np.float32) for s in opt.slots()}
    ref_param, ref_state = param.copy(), {k: v.copy() for k, v in state.items()}
    for step in range(4):
        grad = rng.standard_normal(shape).astype(np.float32)
        opt.apply(param, grad, state, step)
        _ftrl_as_expressions(opt, ref_param, grad, ref_state)
        np.testing.assert_array_equal(param, ref_param)
        for name in opt.slots():
            np.testing.assert_array_equal(state[name], ref_state[name])
    assert (param == 0).any() and (param != 0).any()  # l1 zeroed some weights and kept others
