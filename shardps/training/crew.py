"""The training workers of one run: start them, replace one that died, remove them all."""
from __future__ import annotations

import logging
import os
import time

import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardps.store.cluster import SHARD_CPUS
from shardps.store.errors import ShardUnavailableError
from shardps.training.clock import StepClock
from shardps.training.worker import Worker

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 300.0  # placing a worker and importing TensorFlow in it
PLACEMENT_TIMEOUT_S = 60.0  # how long the workers' CPUs may stay taken by others before the run fails


def process_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (from a step) means a process died or a shard was unreachable, which a retry on
    replaced actors may mend, rather than an error raised by the step's own code, which it would not."""
    while isinstance(exc, RayTaskError) and not isinstance(exc, RayActorError):
        if exc.cause is None or exc.cause is exc:
            return False
        exc = exc.cause
    return isinstance(exc, (RayActorError, ObjectLostError, ShardUnavailableError))


def _wait_for_cpus(cpus: float, count: int, total: float) -> None:
    """Block until the cluster has ``count`` x ``cpus`` CPUs free (others' actors may still be leaving).

    Raises ``TimeoutError`` naming the resources after :data:`PLACEMENT_TIMEOUT_S`.
    """
    deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
    while (free := ray.available_resources().get("CPU", 0.0)) + 1e-6 < cpus * count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers need {cpus:.2f} CPU each ({cpus * count:.2f} in all), but only "
                               f"{free:.2f} of the cluster's {total:g} CPUs stayed free for {PLACEMENT_TIMEOUT_S:g} s "
                               f"(other actors or tasks hold the rest): use fewer workers, free those CPUs or give "
                               f"Ray more (num_cpus)")
        time.sleep(0.2)  # polling Ray's view of free resources


class Crew:
    """One :class:`Worker` actor per part of the training data, spread over the cluster.

    A worker that dies is *replaced* by the trainers (a new actor on the same
    part of the data, :meth:`replace`), up to ``config.max_restarts`` times
    each, rather than restarted by Ray: Ray would have to keep the
    constructor's actor handles and data refs for a restart, and warns about
    exactly that on every run. ``actors`` is updated in place.

    Async and SSP runs also get their :class:`StepClock` here (``clock``;
    ``None`` in sync runs), on the driver's node: it holds the run's progress
    and must not die with another node. Started with the workers, its
    process start-up does not compete with the first training steps.

    Blocks until every worker is up and has traced its model, and the clock
    is up. Raises ``TimeoutError`` when the cluster has no room for them
    (after removing those it started).
    """

    def __init__(self, ps, parts: list, config, build, names: list[str]):
        """``parts``: each worker's data (see :mod:`shardps.training.feed`); ``build``: the model function,
        ``names``: its dense keys."""
        total_cpus = ray.cluster_resources().get("CPU", 1.0)
        shard_actors = ps.num_shards * config.replicas
        # all must fit, also next to shards on a 1-CPU node (shards reserve SHARD_CPUS each)
        cpus = max(0.01, min(1.0 - SHARD_CPUS * shard_actors,
                             (total_cpus - SHARD_CPUS * shard_actors) / config.num_workers))
        quiet = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")}  # TensorFlow's own switch
        _wait_for_cpus(cpus, config.num_workers, total_cpus)
        self._actor = ray.remote(Worker).options(num_cpus=cpus, resources=config.worker_resources or {},
                                                 scheduling_strategy="SPREAD", runtime_env={"env_vars": quiet})
        self._args = (ps, build, names)
        self._config = config
        self._data = parts
        self.replaced = [0] * config.num_workers
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.clock = None if config.mode == "sync" else ray.remote(StepClock).options(
            num_cpus=0, scheduling_strategy=here).remote(config.num_workers, config.bound)
        self.actors = [self._new(i) for i in range(config.num_workers)]
        self._wait_up(self.actors, also=[self.clock.progress.remote()] if self.clock else [])

    def _new(self, i: int):
        return self._actor.remote(i, *self._args, self._data[i], self._config.batch_size, seed=self._config.seed)

    def _wait_up(self, actors: list, also: list = ()) -> None:
        """Block until ``actors`` traced their model and the calls ``also`` answered."""
        try:
            ray.get([w.warm_up.remote() for w in actors] + list(also), timeout=WORKER_START_TIMEOUT_S)
        except GetTimeoutError:
            self.remove()
            raise TimeoutError(f"{len(actors)} workers were not up within {WORKER_START_TIMEOUT_S} s; "
                               f"cluster resources: {ray.cluster_resources()}") from None

    def replace(self, i: int, error: BaseException) -> None:
        """Put a new worker in place of dead worker ``i``; blocks until it is up.

        Re-raises ``error`` (what the dead worker's call raised) once worker
        ``i`` was replaced ``max_restarts`` times.
        """
        if self.replaced[i] >= self._config.max_restarts:
            raise error
        self.replaced[i] += 1
        log.warning("worker %d died (%s); replacing it", i, type(error).__name__)
        ray.kill(self.actors[i])
        self.actors[i] = self._new(i)
        self._wait_up([self.actors[i]])

    def phases_ms_per_step(self) -> dict[str, float]:
        """Mean milliseconds per worker step in each phase (see ``Worker.phases``); blocks on every worker.

        Only workers alive now count: a replaced worker's time before it
        died is lost, as is that of one killed after its last step (the run
        itself is not affected).
        """
        counts = []
        for answer in [worker.phases.remote() for worker in self.actors]:  # all in flight at once
            try:
                counts.append(ray.get(answer, timeout=WORKER_START_TIMEOUT_S))
            except (RayActorError, GetTimeoutError):
                continue
        steps = sum(c.pop("steps") for c in counts)
        phases = {phase for c in counts for phase in c}
        return {phase: round(1000 * sum(c.get(phase, 0.0) for c in counts) / max(1, steps), 3)
                for phase in sorted(phases)}

    def dead(self) -> list[int]:
        """Indices of the workers whose actor is gone. Blocks until each answered one call."""
        pings = [worker.pid.remote() for worker in self.actors]  # all in flight at once
        dead = []
        for i, ping in enumerate(pings):
            try:
                ray.get(ping, timeout=WORKER_START_TIMEOUT_S)
            except RayActorError:
                dead.append(i)
        return dead

    def remove(self) -> None:
        """Kill every worker and the clock. Idempotent."""
        for actor in self.actors + ([self.clock] if self.clock else []):
            ray.kill(actor)
