"""One local Ray session for the whole test run, and the fast lane.

Tests that start Ray (through the ``ray_session`` fixture), TensorFlow or a
subprocess that does are marked ``slow``: ``pytest -m "not slow"`` runs the
plain classes' unit tests alone, without Ray, in well under a minute.
"""
import os
import shutil
import signal
import tempfile

import pytest
import ray

import shardps
from shardps.store.cluster import _loopback_only
from shardps.store.wire import RAY_CONFIG


_SLOW_MODULES = {"test_multinode", "test_security"}  # every test there runs Ray in a subprocess


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in item.fixturenames or item.module.__name__.rsplit(".", 1)[-1] in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request):
    """In the fast lane, a test that started Ray (or TensorFlow) belongs in the slow one: fail it."""
    yield
    if request.node.get_closest_marker("slow") is None and request.config.getoption("markexpr") == "not slow":
        import sys

        assert "tensorflow" not in sys.modules, "a fast test imported TensorFlow: mark it slow"
        assert not ray.is_initialized(), "a fast test started Ray: mark it slow"


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="sps-", dir="/tmp")  # short: Ray's socket paths live here
    with _loopback_only():  # as a local launch() does
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False,
                 _system_config=dict(RAY_CONFIG))
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}shards")
def num_shards(request):
    return request.param


@pytest.fixture
def make_ps(ray_session):
    """``make_ps(num_shards, optimizer=..., **launch_kwargs)``; every router is shut down after the test."""
    routers = []

    def make(num_shards, **kwargs):
        ps = shardps.launch(num_shards, **kwargs)
        routers.append(ps)
        return ps

    yield make
    for ps in routers:
        ps.shutdown()


# the classic MNIST CNN's parameters (float32), used for balance and benchmarks
MNIST_CNN_SHAPES = {
    "conv1/kernel": (5, 5, 1, 32), "conv1/bias": (32,),
    "conv2/kernel": (5, 5, 32, 64), "conv2/bias": (64,),
    "dense1/kernel": (3136, 1024), "dense1/bias": (1024,),
    "dense2/kernel": (1024, 10), "dense2/bias": (10,),
}


def kill_and_wait(actor) -> None:
    """SIGKILL ``actor``'s process (pid from its ``stats()``), then block until Ray restarted it.

    For shard actors: they retry calls (``max_task_retries``), so ``ping`` returns once the new one is up.
    """
    os.kill(ray.get(actor.stats.remote())["pid"], signal.SIGKILL)
    ray.get(actor.ping.remote(), timeout=120)
