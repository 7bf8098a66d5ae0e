"""``--workers N``: the audit's prompts sampled, or the mask search's evaluations run, on N Ray actors, one model
replica each.

The only module of memaudit that imports Ray (an extra: ``pip install 'memaudit[ray]'``). The driver (the process
that runs :func:`memaudit.audit.run_audit`) connects to Ray (a local instance, or the cluster at ``--ray-address``),
starts N actors and hands them work units of whole prompts, a few in flight per actor; each actor holds an
:class:`~memaudit.audit.AuditWorker` (the model on its own GPU, or its share of the CPU threads, and the feature
extractors) and returns per unit what the audit keeps (norms, features, the clique part of each verdict, grids of
flagged prompts). The driver journals every unit as it arrives and assembles the results in prompt order, so they do
not depend on which worker sampled what, or when.

Lost workers: an actor whose process dies is restarted by Ray (``max_restarts``) and its unfinished units run again
(``max_task_retries``). A unit that fails :data:`MAX_TRIES` times (an error, or its worker dying on it every time)
stops the audit with one line naming its prompts and the error; the journal keeps every unit finished before.

Actors are named ``memaudit-audit-<run>-<k>`` in the driver's Ray namespace (``ray.util.list_named_actors()``).

The mask search (``memaudit mitigate search --workers N``, :func:`memaudit.mitigate.search.run_mask_search`) uses the
same connection, checks and restarts through :class:`SearchWorkers`: each actor (``memaudit-search-<run>-<k>``)
holds a :class:`~memaudit.mitigate.search.SearchWorker` (the base model, the proxy and validation splits, its own
:class:`~memaudit.mitigate.search.MaskEvaluator`) and runs one evaluation (a fine-tune and its scores) per task,
one task at a time; the driver keeps NSGA-II, the logs and every file, and writes the evaluations in the order
NSGA-II asked for them. Before the first evaluation, worker 0 fills the latent cache of the proxy images and the
others then find it there (:meth:`SearchWorkers.prepare`), so no two workers encode the same images.
"""

from __future__ import annotations

import abc
import logging
import os
import socket
import uuid
from collections.abc import Callable

from memaudit.errors import ConfigError, MemauditError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'memaudit[ray]'"
#: units in flight per actor: one sampling, the next one waiting (no idle gap between units)
IN_FLIGHT = 2
#: restarts of an actor whose process died, and runs of a unit whose worker died under it, done by Ray
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 2
#: times a unit is submitted before the audit stops (each submission includes Ray's own retries)
MAX_TRIES = 3
ACTOR_PREFIX = "memaudit-audit-"
SEARCH_PREFIX = "memaudit-search-"


class WorkerError(MemauditError):
    """A unit of prompts kept failing on the Ray workers, or the workers were lost."""

    exit_code = 1


def require_ray(what: str = "the audit"):
    """The ``ray`` module, or a one-line error naming the extra that installs it (``what``: the command's work, as
    the message names it)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--workers > 1 runs {what} on Ray, which is not installed; install it with "
                          f"{INSTALL_HINT} (or run with --workers 1).") from None
    return ray


def check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """A one-line error unless ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``; ``auto``/None: no check) accepts
    connections: Ray itself would wait a long time for an address that does not answer."""
    if address is None or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, as `ray start --head` "
                          "prints it) or ray://HOST:PORT.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address} cannot be reached ({e.strerror or e}); start the cluster there "
                          "with `ray start --head`, or check the address.") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


class _WorkerActor(abc.ABC):
    """A Ray actor around one worker object (created with ``ray.remote`` by :class:`RayWorkers`), loaded by
    :meth:`load`. An error while loading is kept and raised by every call, so that it reaches the driver as the
    exception it is (a creation error would only say that the actor died)."""

    def __init__(self, spec):
        self.worker, self.error = None, None
        try:
            self.worker = self.load(spec)
        except Exception as e:  # noqa: BLE001 - reported by ready()
            self.error = e

    @staticmethod
    @abc.abstractmethod
    def load(spec):
        """The worker object a subclass builds from ``spec`` (in the actor's process)."""

    def _check(self):
        if self.error is not None:
            raise self.error
        return self.worker

    def ready(self) -> dict:
        return {"pid": os.getpid(), "machine": self._check().machine()}

    def pid(self) -> int:
        return os.getpid()


class _AuditActor(_WorkerActor):
    """An actor around one :class:`~memaudit.audit.AuditWorker`."""

    @staticmethod
    def load(spec):
        from memaudit.audit import AuditWorker

        return AuditWorker.load(spec)

    def run_unit(self, task: dict) -> dict:
        return self._check().run_unit(**task)

    def first_step_norms(self, prompts: list[str]):
        return self._check().first_step_norms(prompts)

    def round_trip(self, images):
        return self._check().round_trip(images)


class _SearchActor(_WorkerActor):
    """An actor around one :class:`~memaudit.mitigate.search.SearchWorker`."""

    @staticmethod
    def load(spec):
        from memaudit.mitigate.search import SearchWorker

        return SearchWorker.load(spec)

    def prepare(self) -> dict:
        return self._check().prepare()

    def run_unit(self, task: dict) -> dict:
        return self._check().run_unit(task)


class RayWorkers:
    """The driver's side: connect to Ray and check it can hold ``n`` workers (:meth:`__init__`, one-line errors),
    start the actors (:meth:`start`), wait for them (:meth:`ready`), run units (:meth:`run`), and :meth:`close`.

    ``device``: the audit's ``--device``; ``auto`` gives GPU workers (one GPU each) when the cluster has GPUs, else
    CPU workers. CPU workers get ``threads // n`` torch threads each (``threads``: this process's)."""

    #: the command's work, as messages name it
    what = "the audit"

    def __init__(self, n: int, address: str | None = None, device: str = "auto", threads: int = 1):
        ray = require_ray(self.what)
        self.ray, self.n, self.actors, self.machine = ray, n, [], ""
        self.ray_version = ray.__version__
        self.started_ray = False
        check_reachable(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING)
            except Exception as e:  # noqa: BLE001 - whatever Ray raises, one line
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ConfigError(f"could not start or reach {where}: {_first_line(e)}") from None
            self.started_ray = True
        try:
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
            if device == "cuda" or (device == "auto" and gpus > 0):
                if gpus < n:
                    raise ConfigError(f"--workers {n} needs {n} GPUs (one model replica each) but the Ray cluster has "
                                      f"{gpus}; use " + (f"--workers {gpus} or " if gpus > 1 else "") + "--device cpu.")
                self.device_type, self.threads = "cuda", None
                self.options = {"num_gpus": 1, "num_cpus": 1}
            elif device in ("cpu", "auto"):
                self.device_type, self.threads = "cpu", max(1, int(threads) // n)
                if cpus < n * self.threads:
                    raise ConfigError(f"--workers {n} with {self.threads} thread(s) each needs {n * self.threads} CPUs "
                                      f"but the Ray cluster has {cpus}; use fewer --workers or --threads.")
                self.options = {"num_cpus": self.threads}
            else:
                raise ConfigError(f"--device {device!r} cannot be given to Ray workers; use auto, cpu or cuda (each "
                                  "worker gets its own GPU).")
        except BaseException:
            self.close()
            raise
        self.tag = uuid.uuid4().hex[:8]

    # -- actors ----------------------------------------------------------------------------------------------------
    def start(self, spec) -> None:
        """Start the actors (each loads its replica while the driver goes on)."""
        self._launch(_AuditActor, ACTOR_PREFIX, spec)

    def _launch(self, actor: type, prefix: str, spec) -> None:
        actor_class = self.ray.remote(actor)
        for k in range(self.n):
            self.actors.append(actor_class.options(name=f"{prefix}{self.tag}-{k}", max_restarts=MAX_RESTARTS,
                                                   max_task_retries=MAX_TASK_RETRIES, **self.options).remote(spec))
        logger.info("started %d Ray workers (%s, %s)", self.n, self.device_type, self.options)

    def ready(self, progress: Callable[[str, int, int], None] | None = None) -> RayWorkers:
        """Wait until every actor has loaded its model; the first error is raised as one line."""
        progress = progress or (lambda *_: None)
        progress("starting workers", 0, self.n)
        infos, pending = [], [a.ready.remote() for a in self.actors]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            infos.append(self._get(done[0], "starting a worker"))
            progress("starting workers", len(infos), self.n)
        # what one worker runs on (as an audit in one process says it), or each kind when they differ
        self.machine = "; ".join(sorted({info["machine"] for info in infos}))
        return self

    def close(self) -> None:
        """Stop the actors, and Ray when this process started it."""
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
            self.started_ray = False

    # -- calls -----------------------------------------------------------------------------------------------------
    def _get(self, ref, what: str):
        """The result of ``ref``; a memaudit error raised by a worker as itself, anything else as one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, MemauditError):
                raise cause from None
            raise WorkerError(f"{what} failed on a Ray worker: {_first_line(cause or e)}") from None
        except ray.exceptions.RayError as e:
            raise WorkerError(f"{what} failed: the Ray worker was lost ({_first_line(e)})") from None

    def first_step_norms(self, prompts: list[str]):
        return self._get(self.actors[0].first_step_norms.remote(prompts), "the mitigation target")

    def round_trip(self, images):
        return self._get(self.actors[0].round_trip.remote(images), "the VAE round trip of a training image")

    def run(self, tasks: list[dict], on_output: Callable[[dict], None], on_batch=None,
            describe: Callable[[dict], str] = str, in_flight: int = IN_FLIGHT) -> None:
        """Run every unit of ``tasks``, ``in_flight`` per actor, calling ``on_output`` with each result as it
        arrives (in any order). A unit that fails :data:`MAX_TRIES` times (or a memaudit error in a worker) stops
        the run: the units in flight are finished and handed over first, then the error is raised."""
        ray = self.ray
        pending = list(reversed(tasks))
        inflight: dict = {}  # ref -> (task, actor index, tries)
        load = [0] * len(self.actors)
        alive = set(range(len(self.actors)))

        def submit(task: dict, tries: int) -> None:
            k = min(alive, key=lambda a: load[a])
            inflight[self.actors[k].run_unit.remote(task)] = (task, k, tries)
            load[k] += 1

        def fill() -> None:
            while pending and alive and min(load[a] for a in alive) < in_flight:
                submit(pending.pop(), 0)

        failure: MemauditError | None = None  # once set, the units in flight finish (and are kept), no new one starts
        fill()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            task, k, tries = inflight.pop(ready[0])
            load[k] -= 1
            try:
                output = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, MemauditError):
                    failure, pending = failure or cause, []
                    continue
                error = _first_line(cause or e)
            except ray.exceptions.RayActorError as e:
                error = f"its worker died ({_first_line(e)})"
                if isinstance(e, getattr(ray.exceptions, "ActorDiedError", ())):
                    alive.discard(k)  # restarts used up: this actor is gone for good
            else:
                on_output(output)
                if failure is None:
                    fill()
                continue
            if failure is not None:
                continue
            tries += 1
            logger.warning("%s failed (try %d of %d): %s", describe(task), tries, MAX_TRIES, error)
            if tries >= MAX_TRIES:
                failure, pending = WorkerError(f"{describe(task)} failed {tries} times on the Ray workers: {error}"), []
                continue
            if not alive:
                failure, pending = WorkerError(f"every Ray worker was lost; {describe(task)} and the rest were not "
                                               "sampled (the journal keeps what was done)."), []
                continue
            submit(task, tries)
        if failure is not None:
            raise failure


class SearchWorkers(RayWorkers):
    """The mask search's workers: :class:`RayWorkers` (connection, checks, restarts and retries) with actors that
    each hold a :class:`~memaudit.mitigate.search.SearchWorker` and run one evaluation per task."""

    what = "the search"

    def start(self, spec) -> None:
        """Start the actors (each loads the base model and the splits of ``spec`` while the driver goes on)."""
        self._launch(_SearchActor, SEARCH_PREFIX, spec)

    def prepare(self) -> dict | None:
        """The latent cache of the proxy images: filled by worker 0 (its report is returned), then found by the
        others; so no two workers encode the same images at once."""
        first = self._get(self.actors[0].prepare.remote(), "filling the latent cache")
        for ref in [actor.prepare.remote() for actor in self.actors[1:]]:
            self._get(ref, "reading the latent cache")
        return first

    def evaluate(self, jobs: list[dict], on_result: Callable[[int, dict, float], None],
                 describe: Callable[[dict], str] = str) -> None:
        """Run the evaluations ``jobs``, one at a time per worker, all dispatched at once; ``on_result(position,
        result, seconds)`` is called with each as it arrives, in any order (``position``: its index in ``jobs``).
        An evaluation whose worker died runs again (see :meth:`RayWorkers.run`)."""
        tasks = [{**job, "position": k} for k, job in enumerate(jobs)]
        self.run(tasks, lambda out: on_result(int(out["position"]), out["result"], float(out["wall_time_s"])),
                 describe=describe, in_flight=1)
