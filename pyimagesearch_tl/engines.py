"""Where shard work runs: engines that hand shards to workers and give back what they made.

Every engine takes a job (:class:`Job`: extracting features, :class:`~pyimagesearch_tl.features.ExtractionJob`;
classifying photos, :class:`~pyimagesearch_tl.bulk_prediction.PredictionJob`) and a list of
:class:`ShardTask`, and yields ``(index, result, node)`` in any order; shard
files, resume, skips and locks exist once per job kind, in :mod:`pyimagesearch_tl.extraction` and
:mod:`pyimagesearch_tl.bulk_prediction`, whichever engine ran the shards.

``local``
    This process: one backbone, decoding threads running ahead of it.
``ray``
    A Ray cluster (a local one started for the run, or ``address``, e.g. ``auto`` for the cluster
    this machine belongs to): one actor per ``cpus_per_worker`` CPUs of the cluster, each starting the
    job once (building the backbone) and limiting TensorFlow and the decoder to its CPUs. A worker
    process or node that dies is restarted by Ray and its shards are retried. Ray is an optional
    extra; the local engine never imports it.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from typing import Any, Callable, Iterator, Protocol, Sequence

from .errors import ConfigError, PTLError
from .registry import Registry, installed, usable
from .store import FeatureMeta

#: A shard whose worker dies is retried this many times before the run gives up (resumable).
WORKER_RETRIES = 3

#: The engines, by name: classes taking ``(job, **options)`` (see :mod:`pyimagesearch_tl.registry`).
ENGINES: Registry[Callable[..., "Engine"]] = Registry("engine", "engines")


@dataclasses.dataclass
class ShardTask:
    """One shard's work: its images, in order (paths every worker can read)."""

    index: int
    paths: list[str]


def register(name: str, description: str, unusable: Callable[[], str | None] = usable):
    """Class decorator: register an engine class as ``name`` in :data:`ENGINES`."""

    def decorate(cls):
        cls.name = name
        return ENGINES.register(name, cls, description=description, unusable=unusable)

    return decorate


def list_engines() -> list[str]:
    return ENGINES.names()


def engine_class(name: str) -> Callable[..., "Engine"]:
    """The registered engine ``name``; the error lists the valid names."""
    return ENGINES.get(name)


def create_engine(name: str, job: "Job", **options) -> "Engine":
    """Start engine ``name`` with workers that each start ``job`` once."""
    return engine_class(name)(job, **options)


class JobWorker(Protocol):
    """A started job, in a worker process: what :meth:`Job.start` returns."""

    meta: Any  # what the workers compute with (a FeatureMeta, or a bundle's), the same on every worker
    runtime: str  # where its backbone runs (settled on its first batch)

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[int, Any]]:
        """``(task.index, result)`` of each task, in order."""


class Job(Protocol):
    """The work an engine's workers do, picklable (Ray sends it to every worker)."""

    def check(self) -> None:
        """Refuse, on the driver, what would fail on every worker (an unknown backbone, a missing file)."""

    def start(self, cpus: int | None) -> JobWorker:
        """Build what the work needs once (a backbone), its threads limited to ``cpus`` (None: this machine's)."""


class Engine:
    """Base of the engines: a context manager whose :meth:`run` yields ``(index, result, node)``."""

    name = ""
    meta: FeatureMeta
    workers: list[str]  # one description per worker, for the report

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[int, Any, str]]:
        raise NotImplementedError

    def runtimes(self) -> list[str]:
        """Where the workers' backbones run (settled on their first batch)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@register("local", "shards one after the other in this process, decoding overlapping the network")
class LocalEngine(Engine):
    """Shards run one after the other in this process, through one decoding stream."""

    def __init__(self, job: Job, **_ignored):
        self.worker = job.start(None)
        self.meta = self.worker.meta
        self.workers = ["this process"]

    def run(self, tasks):
        for index, result in self.worker.run(tasks):
            yield index, result, "local"

    def runtimes(self) -> list[str]:
        return [self.worker.runtime]


class ShardWorker:
    """The body of a Ray actor: starts the job once (builds the backbone), then runs shard after shard.

    The job comes with each call, as its object reference inside a list (Ray hands it over unresolved),
    and is started on the first: a worker Ray restarts starts it again on its first call. (A constructor
    argument in the object store would make Ray log on stderr, at every run, that a restart needs it.)
    """

    def __init__(self, cpus: int):
        import ray

        # The CPUs Ray gave this worker, no more: the job keeps to them (Job.start).
        self.cpus, self.node = cpus, ray.get_runtime_context().get_node_id()
        self.worker, self.error = None, None

    def _start(self, held: list) -> None:
        import ray

        if self.worker is None and self.error is None:
            try:
                self.worker = ray.get(held[0]).start(self.cpus)
            except PTLError as exc:  # reported by describe(): restarting the worker would not help
                self.error = f"{exc} (on node {self.node[:8]})"

    def describe(self, held: list) -> tuple[Any, str]:
        """The started job's meta and who this worker is, or (None, why the job could not start)."""
        self._start(held)
        if self.worker is None:
            return None, self.error
        return self.worker.meta, f"pid {os.getpid()} on node {self.node[:8]}"

    def runtime(self) -> str:
        return self.worker.runtime

    def run(self, task: ShardTask, held: list) -> tuple[int, Any, str]:
        self._start(held)
        if self.worker is None:
            raise PTLError(self.error)
        [(index, result)] = self.worker.run([task])
        return index, result, self.node


def import_ray():
    """The ``ray`` module, or one clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray engine needs Ray, an optional extra: pip install 'pyimagesearch_tl[ray]'") from None
    return ray


def _ray_missing() -> str | None:
    return None if installed("ray") else "pip install 'pyimagesearch_tl[ray]'"


@register("ray", "shards spread over the actors of a Ray cluster (--ray-address), resumable", _ray_missing)
class RayEngine(Engine):
    """Shards spread over the actors of a Ray cluster, two in flight per actor so none waits."""

    def __init__(self, job: Job, address: str | None = None, cpus_per_worker: int = 1, **_ignored):
        job.check()  # the user's mistakes are found here, not on every worker
        ray = self._ray = import_ray()
        self._started = not ray.is_initialized()
        if self._started:
            settings = dict(
                log_to_driver=False, logging_level="ERROR", runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}
            )
            if address is None:  # a local instance for this run only
                settings["include_dashboard"] = False
            try:
                ray.init(address=address, **settings)
            except (ConnectionError, RuntimeError) as exc:
                raise PTLError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
        largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if cpus_per_worker > largest:
            self.close()
            raise ConfigError(
                f"ray_cpus_per_worker={cpus_per_worker} but the largest node of the cluster has "
                f"{largest:g} CPUs; no worker could start"
            )
        count = max(1, int(ray.cluster_resources().get("CPU", 0)) // cpus_per_worker)
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=WORKER_RETRIES, max_task_retries=WORKER_RETRIES)(
            ShardWorker
        )
        # The job (an int8 network, a model file: megabytes) goes into the object store once, held here so a
        # restarted worker finds it; each call carries its reference (see ShardWorker).
        self._job = [ray.put(job)]
        self.actors = [actor.remote(cpus_per_worker) for _ in range(count)]
        described = self._get([a.describe.remote(self._job) for a in self.actors])
        failed = [why for meta, why in described if meta is None]
        if failed:
            self.close()
            raise PTLError(failed[0])
        self.meta = described[0][0]
        self.workers = [d for _, d in described]

    def _get(self, refs):
        ray = self._ray
        try:
            return ray.get(refs)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            raise PTLError(
                f"a Ray worker died {WORKER_RETRIES + 1} times ({type(exc).__name__}); "
                "finished shards are kept: rerun the same command to resume"
            ) from None

    def run(self, tasks):
        ray = self._ray
        queue, in_flight = deque(tasks), {}

        def submit(actor):
            if queue:
                in_flight[actor.run.remote(queue.popleft(), self._job)] = actor

        for actor in self.actors:
            submit(actor)
            submit(actor)
        while in_flight:
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            actor = in_flight.pop(ready)
            yield self._get(ready)
            submit(actor)

    def runtimes(self) -> list[str]:
        return sorted(set(self._get([a.runtime.remote() for a in self.actors])))

    def close(self) -> None:
        ray = self._ray
        for actor in getattr(self, "actors", []):
            ray.kill(actor)
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
