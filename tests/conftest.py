"""One local Ray session for the whole test run."""
import os
import shutil
import tempfile

import numpy as np
import pytest
import ray

import shardps
from shardps.cluster import _loopback_only


@pytest.fixture(scope="session")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="sps-", dir="/tmp")  # short: Ray's socket paths live here
    with _loopback_only():  # as a local launch() does
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, configure_logging=False)
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


def random_params(rng, shapes, dtype=np.float32):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
