"""Update rules against the per-key oracle, and their argument checks (no Ray)."""
import numpy as np
import pytest

from shardps import SGD, Adagrad, Adam, Momentum
from shardps.optim import optimizer_config, optimizer_from_config
from tests.oracle import DictServer

ALL = [SGD(lr=0.1), Momentum(lr=0.1, momentum=0.9), Adam(lr=0.01), Adagrad(lr=0.1)]


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
                                  lambda: optimizer_from_config({"name": "rmsprop"})])
def test_bad_hyperparameters_rejected(make):
    with pytest.raises(ValueError):
        make()
