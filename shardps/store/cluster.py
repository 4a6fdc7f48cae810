"""launch() and restore(): start or join Ray, place the shard actors, hand back a Router."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardps.store import checkpoint, snapshot
from shardps.store.optim import SGD, optimizer_config, optimizer_from_config
from shardps.store.placement import DEFAULT_BLOCK_BYTES, HashPartitioner, Layout, check_resources
from shardps.store.router import Router
from shardps.store.shard.actor import ParameterShard
from shardps.store.shard.recovery import replication_restarts
from shardps.store.tables import TableSpec
from shardps.store.wire import RAY_CONFIG

log = logging.getLogger(__name__)

SHARD_CPUS = 0.01  # shards mostly wait on messages; a whole CPU each would starve workers on 2 cores
_ray_users: int | None = None  # stores running on the Ray that launch() started in this process (None: none)


def start_ray(address: str | None = None, *, num_cpus: int | None = None,
              object_store_bytes: int | None = None) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray listening on 127.0.0.1 only.

    ``object_store_bytes``: size of a local Ray's object store (default:
    Ray's, 30 % of memory). Ignored when joining a cluster.

    A local Ray passes objects up to 1 MiB inside its messages (Ray's
    default: 100 KiB): a CTR step's pull and push (~120 KB at batch 256)
    then skip the object store, whose create/seal/free round trips through
    the raylet cost a quarter of a core in training on 2 cores. A cluster
    is joined as it was started (start its nodes with
    ``RAY_max_direct_call_object_size=1048576`` for the same effect).

    The CLI also switches on Ray's token authentication for a local run
    (``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN``, set before Ray
    is imported), which keeps other users of this machine out too.

    Returns True when this call started (or connected) Ray, so the caller
    should ``ray.shutdown()`` at the end; False when Ray was already running.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray with %d CPUs", num_cpus)
        with _loopback_only():
            ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
                     object_store_memory=object_store_bytes, _system_config=dict(RAY_CONFIG))  # Ray adds to it
    return True


CONNECT_TIMEOUT_S = 10.0  # for the first contact with a cluster's head


def _check_reachable(address: str) -> None:
    """Raise ``ConnectionError`` at once if nothing listens at a ``host:port`` address.

    Ray itself keeps retrying an unreachable head for minutes; other forms
    (``auto``, ``ray://...``) are left to Ray.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): "
                              "start one with `ray start --head` or check --address") from None


@contextlib.contextmanager
def _loopback_only():
    """While active, a Ray started here binds its servers to 127.0.0.1 instead of every interface.

    Ray takes its node address from ``services.get_node_ip_address()``, which
    answers 127.0.0.1 when ``ray_constants.ENABLE_RAY_CLUSTER`` is false: the
    single-machine mode Ray uses on macOS and Windows (environment variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when Ray is imported, hence
    the constant). Only around ``ray.init``, so joining a cluster later in
    this process is unaffected. Checked with ``ss -ltnp`` on Ray 2.60 and by
    ``tests/test_security.py``; a Ray without the constant is left alone.
    """
    from ray._private import ray_constants

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if before is None:
        log.warning("this Ray has no single-machine mode: its servers listen on every interface")
    else:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = before


def launch(num_shards: int = 1, *, optimizer=None, address: str | None = None,
           block_bytes: int = DEFAULT_BLOCK_BYTES, allow_nonfinite: bool = False,
           num_cpus: int | None = None, shard_resources: dict | None = None,
           max_restarts: int | None = None, checkpoint_dir: str | None = None, replicas: int = 1,
           timeout: float | None = 120.0, store_id: str | None = None) -> Router:
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
            router re-send its call). A restarted shard copies its replica
            (nothing lost), else reloads its part of the latest checkpoint in
            ``checkpoint_dir`` (what was pushed after it is lost). Default:
            3 with ``replicas=2``, else 0.
        checkpoint_dir: where ``save()`` writes checkpoints, for restarts.
        replicas: 2 mirrors every shard on a replica actor, on another node
            where the cluster has one: each change is applied on both before
            it is acknowledged (a push costs a second round trip), so no
            acknowledged push is lost when one of the two dies.
        timeout: seconds to wait for the shards to be placed (None: forever).
        store_id: this store's identity, written into its checkpoints; a
            restarted shard reloads only a checkpoint with the same id
            (default: a fresh one; ``restore()`` passes the checkpoint's).

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
    max_restarts = replication_restarts(replicas, max_restarts)
    optimizer = SGD(lr=0.01) if optimizer is None else optimizer
    optimizer_config(optimizer)  # raises ValueError naming the argument for anything but SGD ... FTRL
    check_resources("shard_resources", shard_resources)
    shares_ray = _use_ray(address, num_cpus)
    group, shards, copies = None, [], []

    def release() -> None:
        if ray.is_initialized():
            for actor in shards + copies:
                ray.kill(actor)
            if group is not None:
                remove_placement_group(group)
        if shares_ray:
            _leave_ray()

    try:
        bundle = {"CPU": SHARD_CPUS, **(shard_resources or {})}
        group = placement_group([bundle] * num_shards * replicas, strategy="SPREAD")
        if not group.wait(timeout_seconds=timeout if timeout is not None else 10**9):
            raise TimeoutError(f"could not place {num_shards * replicas} shard actors within {timeout} s: "
                               f"cluster resources are {ray.cluster_resources()}")
        nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
        primary_bundles, replica_bundles = pair_bundles([nodes[i] for i in range(len(nodes))], num_shards, replicas)
        actor = ray.remote(ParameterShard)
        store_id = store_id or uuid.uuid4().hex
        recovery = {"checkpoint_dir": None if checkpoint_dir is None else os.path.abspath(checkpoint_dir),
                    "num_shards": num_shards, "block_bytes": block_bytes, "store": store_id}

        def options(bundle_index: int) -> dict:
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index)
            # max_task_retries: Ray re-sends a call once the shard is back (at least once); the shard's
            # record of applied pushes makes that exactly once
            return {"num_cpus": SHARD_CPUS, "resources": shard_resources or {}, "scheduling_strategy": strategy,
                    "max_restarts": max_restarts, "max_task_retries": -1 if max_restarts else 0}

        names = [f"shardps-{uuid.uuid4().hex}-replica-{i}" for i in range(num_shards)]  # shards look them up
        for i, bundle_index in enumerate(replica_bundles):
            copies.append(actor.options(name=names[i], **options(bundle_index)).remote(i, optimizer, is_replica=True))
        for i, bundle_index in enumerate(primary_bundles):
            replica = names[i] if copies else None
            shards.append(actor.options(**options(bundle_index)).remote(i, optimizer, recovery=recovery,
                                                                         replica=replica))
        ray.get([shard.ping.remote() for shard in shards + copies], timeout=timeout)
    except BaseException:
        release()
        raise
    return Router(shards, Layout(partitioner), optimizer=optimizer, allow_nonfinite=allow_nonfinite,
                  replicas=copies or None, on_shutdown=release, store_id=store_id)


def _use_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start or join Ray for one store. True if the store runs on a Ray that launch() started here.

    Such a Ray is shut down when the last store using it is (two stores in
    one process do not stop each other's Ray); a Ray started by the user is
    left running.
    """
    global _ray_users
    if start_ray(address, num_cpus=num_cpus):
        _ray_users = 1
        return True
    if _ray_users is not None:
        _ray_users += 1
        return True
    return False


@contextlib.contextmanager
def using_ray(address: str | None = None, num_cpus: int | None = None):
    """Ray for the ``with`` block: started or joined as :func:`launch` does (and left at the end, after
    the stores launched inside), or the Ray already running. For work that needs Ray before the shards
    exist (reading a Ray dataset)."""
    shares_ray = _use_ray(address, num_cpus)
    try:
        yield
    finally:
        if shares_ray:
            _leave_ray()


def _leave_ray() -> None:
    global _ray_users
    _ray_users -= 1
    if _ray_users == 0:
        _ray_users = None
        ray.shutdown()


def pair_bundles(nodes: list[str], num_shards: int, replicas: int) -> tuple[list[int], list[int]]:
    """Placement-group bundle indices for the shards and their replicas (empty when ``replicas == 1``).

    ``nodes[i]`` is the node of bundle i. Shards take the bundles in order
    (SPREAD already put them on as many nodes as it could); each replica
    takes a free bundle on another node than its shard's where one is left.
    """
    shards = list(range(num_shards))
    if replicas == 1:
        return shards, []
    free = list(range(num_shards, len(nodes)))
    chosen = []
    for shard in shards:
        elsewhere = [b for b in free if nodes[b] != nodes[shard]]
        pick = (elsewhere or free)[0]
        if not elsewhere and len(set(nodes)) > 1:
            log.warning("the replica of shard %d shares its node: losing that node loses both", shard)
        free.remove(pick)
        chosen.append(pick)
    return shards, chosen


def restore(path: str | os.PathLike, num_shards: int | None = None, address: str | None = None, **launch_kwargs):
    """Launch shards holding a checkpoint's parameters, optimizer state and tables; returns the Router.

    ``num_shards=None`` keeps the saved shard count; any other count
    re-shards (values and optimizer state are identical; each table row goes
    to the shard its id hashes to). The checkpoint is read and checked
    completely before any shard starts. Blocks until loaded.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: a corrupt, truncated or inconsistent checkpoint (names the file).
    """
    return launch_from(checkpoint.read(path), num_shards=num_shards, address=address, **launch_kwargs)


def launch_from(saved: checkpoint.Checkpoint, *, num_shards: int | None = None, **launch_kwargs) -> Router:
    """:func:`restore` from what :func:`shardps.store.checkpoint.read` returned. The new store keeps the
    checkpoint's id."""
    manifest = saved.manifest
    num_shards = num_shards or manifest["num_shards"]
    for entry in manifest["tables"]:  # a max_rows that leaves a shard no row: refused before anything starts
        TableSpec.from_json(entry).for_shard(num_shards)
    launch_kwargs.setdefault("block_bytes", manifest["block_bytes"])
    launch_kwargs.setdefault("store_id", manifest.get("store"))
    ps = launch(num_shards, optimizer=optimizer_from_config(manifest["optimizer"]), **launch_kwargs)
    try:
        snapshot.load(ps, saved)
    except BaseException:
        ps.shutdown()
        raise
    return ps
