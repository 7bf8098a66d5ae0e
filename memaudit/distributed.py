"""``--workers N``: work units run on N Ray actors, one model replica each.

The only module of memaudit that imports Ray (an extra: ``pip install 'memaudit[ray]'``). It knows nothing of what
the units are: :class:`RayWorkers` connects to Ray (a local instance, or the cluster at ``--ray-address``), checks
that the cluster can hold ``n`` workers, starts ``n`` actors that each build their worker object with a factory the
caller brings (:meth:`RayWorkers.start`; in the actor's process), and hands them units, a few in flight per actor
(:meth:`RayWorkers.run`). The audit brings :class:`~memaudit.audit.AuditWorker` (sampling and scoring whole prompts),
the mask search :class:`~memaudit.mitigate.search.SearchWorker` (one fine-tune and its scores per unit); each driver
journals or logs the results as they arrive and puts them in order itself, so they do not depend on which worker ran
what, or when.

Lost workers: an actor whose process dies is restarted by Ray (``max_restarts``) and its unfinished units run again
(``max_task_retries``). A unit that fails :data:`MAX_TRIES` times (an error, or its worker dying on it every time)
stops the run with one line naming the unit and the error; the results handed over before are the caller's to keep.

Actors are named ``memaudit-<name>-<run>-<k>`` in the driver's Ray namespace (``ray.util.list_named_actors()``), where
``name`` is the caller's (``audit``, ``search``).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable

from memaudit.core.errors import ConfigError, MemauditError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'memaudit[ray]'"
#: units in flight per actor: one sampling, the next one waiting (no idle gap between units)
IN_FLIGHT = 2
#: restarts of an actor whose process died, and runs of a unit whose worker died under it, done by Ray
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 2
#: times a unit is submitted before the run stops (each submission includes Ray's own retries)
MAX_TRIES = 3


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


class _Actor:
    """A Ray actor around one worker object (created with ``ray.remote`` by :class:`RayWorkers`), built in the
    actor's process by ``factory(spec)``. An error while building is kept and raised by every call, so that it
    reaches the driver as the exception it is (a creation error would only say that the actor died)."""

    def __init__(self, factory: Callable, spec):
        self.worker, self.error = None, None
        try:
            self.worker = factory(spec)
        except Exception as e:  # noqa: BLE001 - reported by ready()
            self.error = e

    def _check(self):
        if self.error is not None:
            raise self.error
        return self.worker

    def ready(self) -> dict:
        return {"pid": os.getpid(), "machine": self._check().machine()}

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, args: tuple = (), kwargs: dict | None = None):
        """``worker.method(*args, **kwargs)``."""
        return getattr(self._check(), method)(*args, **(kwargs or {}))


class RayWorkers:
    """The driver's side: connect to Ray and check it can hold ``n`` workers (:meth:`__init__`, one-line errors),
    start the actors (:meth:`start`), wait for them (:meth:`ready`), run units (:meth:`run`) or single calls
    (:meth:`call`, :meth:`call_each`), and :meth:`close`.

    ``device``: the command's ``--device``; ``auto`` gives GPU workers (one GPU each) when the cluster has GPUs, else
    CPU workers. CPU workers get ``threads // n`` torch threads each (``threads``: this process's). ``what``: the
    command's work, as messages name it; ``name``: the middle of the actors' names."""

    def __init__(self, n: int, address: str | None = None, device: str = "auto", threads: int = 1, *,
                 what: str = "the work", name: str = "work"):
        self.what, self.name = what, name
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
    def start(self, factory: Callable, spec) -> None:
        """Start the actors; each builds its worker with ``factory(spec)`` in its own process (loading its model
        replica while the driver goes on). ``factory`` must be importable by name (a module-level function or a
        class's method): Ray sends it by reference."""
        actor_class = self.ray.remote(_Actor)
        for k in range(self.n):
            self.actors.append(actor_class.options(name=f"memaudit-{self.name}-{self.tag}-{k}",
                                                   max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                                                   **self.options).remote(factory, spec))
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

    def call(self, method: str, *args, what: str, actor: int = 0):
        """``worker.method(*args)`` on one actor (the first by default); ``what`` names the work in errors."""
        return self._get(self.actors[actor].call.remote(method, args), what)

    def call_each(self, method: str, *args, what: str, actors: range | None = None) -> list:
        """``worker.method(*args)`` on every actor of ``actors`` (default: all) at once; their results in order."""
        refs = [self.actors[k].call.remote(method, args) for k in (actors if actors is not None else
                                                                    range(len(self.actors)))]
        return [self._get(ref, what) for ref in refs]

    def run(self, tasks: list[dict], on_output: Callable[[dict], None], describe: Callable[[dict], str] = str,
            in_flight: int = IN_FLIGHT, method: str = "run_unit", keywords: bool = False) -> None:
        """Run every unit of ``tasks`` (``worker.method(task)``, or ``worker.method(**task)`` with ``keywords``),
        ``in_flight`` per actor, calling ``on_output`` with each result as it arrives (in any order). A unit that
        fails :data:`MAX_TRIES` times (or a memaudit error in a worker) stops the run: the units in flight are
        finished and handed over first, then the error is raised."""
        ray = self.ray
        pending = list(reversed(tasks))
        inflight: dict = {}  # ref -> (task, actor index, tries)
        load = [0] * len(self.actors)
        alive = set(range(len(self.actors)))

        def submit(task: dict, tries: int) -> None:
            k = min(alive, key=lambda a: load[a])
            args, kwargs = ((), task) if keywords else ((task,), None)
            inflight[self.actors[k].call.remote(method, args, kwargs)] = (task, k, tries)
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
                                               "run (what was done before is kept)."), []
                continue
            submit(task, tries)
        if failure is not None:
            raise failure
