"""A shard's update, chunked and spread over threads, against one optimizer call per range (no Ray)."""
import platform
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from shardps import SGD, Adagrad, Adam, Momentum
from shardps.store import update
from shardps.store.optim import FTRL

ALL = [SGD(lr=-1.0), SGD(lr=0.1), Momentum(lr=0.1, momentum=0.9), Adam(lr=0.01), Adagrad(lr=0.1),
       FTRL(lr=0.1, l1=0.05, l2=0.01, beta=0.5)]


class _Recording:
    """An optimizer that notes which threads applied it."""

    def __init__(self, inner):
        self.inner, self.threads = inner, set()

    def apply(self, param, grad, state, step):
        self.threads.add(threading.get_ident())
        self.inner.apply(param, grad, state, step)


def _group(opt, size, rng):
    return SimpleNamespace(params=rng.standard_normal(size).astype(np.float32),
                           state={s: rng.random(size).astype(np.float32) for s in opt.slots()})


def _copy(group):
    return SimpleNamespace(params=group.params.copy(), state={k: v.copy() for k, v in group.state.items()})


@pytest.mark.parametrize("opt", ALL, ids=lambda o: f"{type(o).__name__}({getattr(o, 'lr', '')})")
@pytest.mark.parametrize("threads", [2, 3])
def test_large_update_over_threads_equals_one_call_per_range(opt, threads, monkeypatch):
    monkeypatch.setattr(update, "THREADS", threads)
    monkeypatch.setattr(update, "_pool", None)
    rng = np.random.default_rng(threads)
    size = update.PARALLEL_ELEMENTS + 3 * update.CHUNK + 12345
    group = _group(opt, size, rng)
    expected = _copy(group)
    grad = rng.standard_normal(size).astype(np.float32)
    # ragged pieces with gaps, and a step per piece (Adam's bias correction differs per key)
    bounds = [(0, 1000), (1500, update.CHUNK + 7), (update.CHUNK + 7, size - 50)]
    pieces = [(group, lo, hi, grad[lo:hi], step) for step, (lo, hi) in enumerate(bounds)]
    recording = _Recording(opt)
    update.apply(recording, pieces)
    for step, (lo, hi) in enumerate(bounds):
        opt.apply(expected.params[lo:hi], grad[lo:hi], {k: v[lo:hi] for k, v in expected.state.items()}, step)
    assert len(recording.threads) >= 2  # the caller and a pool thread (which may run several shares)
    np.testing.assert_array_equal(group.params, expected.params)
    for name in opt.slots():
        np.testing.assert_array_equal(group.state[name], expected.state[name])


@pytest.mark.parametrize("workers", [2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_several_gradients_apply_their_mean_as_np_mean_does(workers, threads, monkeypatch):
    monkeypatch.setattr(update, "THREADS", threads)
    monkeypatch.setattr(update, "_pool", None)
    rng = np.random.default_rng(workers)
    size = update.PARALLEL_ELEMENTS + update.CHUNK + 99
    opt = Adam(lr=0.01)
    group = _group(opt, size, rng)
    expected = _copy(group)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(workers)]
    sent = [g.copy() for g in grads]
    bounds = [(0, 1000), (1000, update.CHUNK + 5), (update.CHUNK + 5, size)]
    update.apply(opt, [(group, lo, hi, tuple(g[lo:hi] for g in grads), step) for step, (lo, hi) in enumerate(bounds)])
    mean = np.mean(grads, axis=0, dtype=np.float32)  # what the shard computed before averaging per chunk
    for step, (lo, hi) in enumerate(bounds):
        opt.apply(expected.params[lo:hi], mean[lo:hi], {k: v[lo:hi] for k, v in expected.state.items()}, step)
    np.testing.assert_array_equal(group.params, expected.params)
    for name in opt.slots():
        np.testing.assert_array_equal(group.state[name], expected.state[name])
    assert all(np.array_equal(g, h) for g, h in zip(grads, sent))  # the workers' messages are not written to


def test_small_update_stays_on_the_calling_thread(monkeypatch):
    monkeypatch.setattr(update, "THREADS", 2)
    rng = np.random.default_rng(0)
    group = _group(SGD(), update.PARALLEL_ELEMENTS - 1, rng)
    expected = group.params - 0.01 * np.ones_like(group.params)
    recording = _Recording(SGD())
    update.apply(recording, [(group, 0, group.params.size, np.ones_like(group.params), 0)])
    assert recording.threads == {threading.get_ident()}
    np.testing.assert_array_equal(group.params, expected)


def test_nothing_to_apply_is_a_no_op():
    update.apply(SGD(), [])


_FAULTS = """
import resource, sys, numpy as np
from types import SimpleNamespace
from shardps import Adagrad, Adam
from shardps.store import update
from shardps.store.optim import FTRL


class FreshTemporaries(Adam):
    def apply(self, param, grad, state, step):  # Adam as plain expressions: a new temporary for each term
        m, v = state["m"], state["v"]
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        v += (1 - self.beta2) * np.square(grad)
        param -= np.float32(self.lr) * m / (np.sqrt(v) + self.eps)


opt = {"adam": Adam(), "adagrad": Adagrad(), "ftrl": FTRL(l1=0.01), "fresh": FreshTemporaries()}[sys.argv[1]]
update.THREADS = 1
n = 8 * update.CHUNK
group = SimpleNamespace(params=np.ones(n, np.float32), state={s: np.zeros(n, np.float32) for s in opt.slots()})
grad = np.full(n, 1e-3, np.float32)
update.apply(opt, [(group, 0, n, grad, 0)])  # touches the parameters and the state for the first time
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(1, 6):
    update.apply(opt, [(group, 0, n, grad, step)])
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_optimizers_reuse_their_scratch_memory():
    """Five Adam/Adagrad/FTRL updates of 8 MiB, chunk by chunk: no page faults once warm (fresh
    temporaries would fault on every chunk where the C library returns freed memory at once)."""
    faults = {name: int(subprocess.run([sys.executable, "-c", _FAULTS, name], capture_output=True, text=True,
                                       check=True).stdout) for name in ("adam", "adagrad", "ftrl", "fresh")}
    assert faults["adam"] < 100 and faults["adagrad"] < 100 and faults["ftrl"] < 100, faults
    if platform.libc_ver()[0] == "glibc":  # the pathology this guards against, seen on this C library
        assert faults["fresh"] > 1000, faults
