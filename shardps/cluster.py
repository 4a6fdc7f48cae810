"""launch(): start or join Ray, place the shard actors, hand back a Router."""
from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardps.optim import SGD
from shardps.partition import DEFAULT_BLOCK_BYTES, HashPartitioner, Layout
from shardps.router import Router
from shardps.shard import ParameterShard

log = logging.getLogger(__name__)

SHARD_CPUS = 0.01  # shards mostly wait on messages; a whole CPU each would starve workers on 2 cores


def start_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray.

    Ray's servers listen on every interface even for a local run; its token
    authentication (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in the
    environment before Ray is imported) keeps others out. The CLI does that.

    Returns True when this call started (or connected) Ray, so the caller
    should ``ray.shutdown()`` at the end; False when Ray was already running.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray with %d CPUs", num_cpus)
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    return True


def launch(num_shards: int = 1, *, optimizer=None, address: str | None = None,
           block_bytes: int = DEFAULT_BLOCK_BYTES, allow_nonfinite: bool = False,
           num_cpus: int | None = None, shard_resources: dict | None = None,
           max_restarts: int = 0, checkpoint_dir: str | None = None,
           timeout: float | None = 120.0) -> Router:
    """Start ``num_shards`` parameter shards and return the Router that owns them.

    Starts a local Ray when none is running (or joins ``address`` /
    ``RAY_ADDRESS``). Shards go into a SPREAD placement group, so on a
    multi-node cluster they land on different nodes. Blocks until every shard
    is up. Use the result as a context manager, or call ``shutdown()``: it
    removes the actors and the placement group (and stops Ray if this call
    started it).

    Args:
        num_shards: number of shard actors, at least 1.
        optimizer: server-side update rule (default ``SGD(lr=0.01)``).
        address: a Ray cluster to join, e.g. ``"10.0.0.1:6379"``.
        block_bytes: tensors larger than this are split over shards.
        allow_nonfinite: accept NaN/Inf in pushes instead of raising.
        num_cpus: CPUs of a locally started Ray (default: all).
        shard_resources: extra Ray resources each shard needs, e.g.
            ``{"ps_server": 0.01}`` to keep shards on nodes that offer it.
        max_restarts: how often Ray may restart a crashed shard (and the
            router re-send its call). A restarted shard reloads its part of
            the latest checkpoint in ``checkpoint_dir``; what was pushed
            after that checkpoint is lost.
        checkpoint_dir: where ``save()`` writes checkpoints, for restarts.
        timeout: seconds to wait for the shards to be placed (None: forever).

    Raises:
        ValueError: bad arguments (checked before Ray starts).
        TimeoutError: the cluster has no room for the shards.

    Example:
        >>> with shardps.launch(num_shards=2, optimizer=shardps.SGD(lr=0.1)) as ps:
        ...     ps.register({"w": np.zeros(3, np.float32)})
        ...     ps.push({"w": np.ones(3, np.float32)})
        ...     ps.pull(["w"])["w"]
        array([-0.1, -0.1, -0.1], dtype=float32)
    """
    partitioner = HashPartitioner(num_shards, block_bytes=block_bytes)  # validates both
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"Argument `max_restarts` must be an integer >= 0. Received: {max_restarts!r}")
    optimizer = SGD(lr=0.01) if optimizer is None else optimizer
    if not hasattr(optimizer, "apply"):
        raise ValueError(f"Argument `optimizer` must be one of shardps.SGD/Momentum/Adam/Adagrad. Received: {optimizer!r}")
    started = start_ray(address, num_cpus=num_cpus)
    group, shards = None, []

    def release() -> None:
        for shard in shards:
            ray.kill(shard)
        if group is not None:
            remove_placement_group(group)
        if started:
            ray.shutdown()

    try:
        bundle = {"CPU": SHARD_CPUS, **(shard_resources or {})}
        group = placement_group([bundle] * num_shards, strategy="SPREAD")
        if not group.wait(timeout_seconds=timeout if timeout is not None else 10**9):
            raise TimeoutError(f"could not place {num_shards} shards within {timeout} s: "
                               f"cluster resources are {ray.cluster_resources()}")
        actor = ray.remote(ParameterShard)
        recovery = {"checkpoint_dir": None if checkpoint_dir is None else os.path.abspath(checkpoint_dir),
                    "num_shards": num_shards, "block_bytes": block_bytes}
        for i in range(num_shards):
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
            options = {"num_cpus": SHARD_CPUS, "resources": shard_resources or {}, "scheduling_strategy": strategy,
                       "max_restarts": max_restarts}
            shards.append(actor.options(**options).remote(i, optimizer, recovery=recovery))
        ray.get([shard.ping.remote() for shard in shards], timeout=timeout)
    except BaseException:
        release()
        raise
    return Router(shards, Layout(partitioner), optimizer=optimizer, allow_nonfinite=allow_nonfinite,
                  retries=max_restarts, on_shutdown=release)
