"""The search's evaluations on Ray workers (``SearchConfig.workers > 1``): :class:`SearchWorker` (a
:class:`MaskEvaluator` of its own in each worker), what a worker needs to build it (:class:`SearchWorkerSpec`), and the
:data:`RunJobs` that dispatches evaluations to a :class:`memaudit.distributed.RayWorkers` pool (:func:`on_workers`).
Only this module of the search touches :mod:`memaudit.distributed` (and through it Ray, which is optional)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from memaudit.core.provenance import machine
from memaudit.data import ImageCaptionDataset
from memaudit.distributed import RayWorkers, check_reachable, require_ray
from memaudit.latents import latent_cache_root
from memaudit.mitigate.search.config import SearchConfig
from memaudit.mitigate.search.evaluator import MaskEvaluator
from memaudit.mitigate.search.nsga2 import OnResult, Progress
from memaudit.target import load_target

__all__ = ["SearchWorker", "SearchWorkerSpec", "check_ray", "describe_job", "on_workers", "open_pool"]


def _absolute(dataset):
    """``dataset`` with absolute image paths (a worker's working folder may be another one)."""
    if not dataset.on_disk:
        return dataset
    return ImageCaptionDataset(dataset.captions, dataset.names, dataset.source,
                               files=[f.resolve() for f in dataset.files], resolution=dataset.resolution,
                               channels=dataset.channels, digests=dataset.file_digests())


def describe_job(job: dict) -> str:
    """An evaluation, as messages name it."""
    lr = f"lr {float(job['learning_rate']):g}"
    if job.get("mask") is None:
        return f"the evaluation of {job.get('method') or 'the method'} with every unit at {lr}"
    return f"the evaluation of mask {''.join(str(int(b)) for b in job['mask'])} at {lr}"


@dataclass
class SearchWorkerSpec:
    """What a worker process needs to build its own :class:`MaskEvaluator`: the base model (a folder or hub id it can
    reach, and adapters ``[[path, scale], ...]``), the search settings, the proxy and validation splits (their image
    paths, or their pixels for data held in memory), its device and CPU threads, and the cache folder."""

    base: str
    loras: list
    config: dict
    proxy: object
    val: object
    device: str
    threads: int | None = None
    cache_dir: str | None = None


class SearchWorker:
    """Runs evaluations of the search: the same :class:`MaskEvaluator` as in the driver, in a Ray worker."""

    def __init__(self, evaluator: MaskEvaluator):
        self.evaluator = evaluator

    @classmethod
    def load(cls, spec: SearchWorkerSpec) -> SearchWorker:
        """Load the base model of ``spec`` in this process (a Ray worker) and build the evaluator on its splits."""
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        config = SearchConfig(**spec.config)
        target = load_target(spec.base, device=spec.device, dtype="float32", loras=spec.loras)
        return cls(MaskEvaluator(target, spec.proxy, spec.val, config, cache_dir=spec.cache_dir))

    def machine(self) -> str:
        return machine(self.evaluator.target.device)

    def prepare(self) -> dict:
        """The proxy images' latents, from the latent cache (encoded into it when it lacks them); what it held."""
        return self.evaluator.latents.report

    def run_unit(self, task: dict) -> dict:
        """One evaluation (a job of :meth:`MaskEvaluator.run` with its ``position``): its result and seconds."""
        t0 = time.perf_counter()
        result = self.evaluator(task.get("mask"), task["learning_rate"], method=task.get("method"),
                                steps=task.get("steps"))
        return {"position": task["position"], "result": result, "wall_time_s": time.perf_counter() - t0}


class _OnWorkers:
    """A :data:`RunJobs` on Ray workers: started at the first jobs (worker 0 fills the latent cache first, then the
    others find it), then every call's jobs are dispatched at once, one per worker at a time."""

    def __init__(self, pool, spec: SearchWorkerSpec, progress: Progress | None):
        self.pool, self.spec, self.progress = pool, spec, progress or (lambda *_: None)
        self.started, self.cache_report = False, None

    def __call__(self, jobs: list[dict], on_result: OnResult) -> None:
        if not jobs:
            return
        if not self.started:
            self.pool.start(SearchWorker.load, self.spec)
            self.pool.ready(self.progress)
            self.started = True
            # the latent cache of the proxy images: filled by worker 0, then found by the others (no two workers
            # encode the same images at once)
            self.cache_report = self.pool.call("prepare", what="filling the latent cache")
            self.pool.call_each("prepare", what="reading the latent cache", actors=range(1, self.pool.n))
            encoded = int(self.cache_report.get("encoded", 0))
            if encoded:
                self.progress("latent cache", encoded, encoded)
        # one evaluation at a time per worker, all dispatched at once; an evaluation whose worker died runs again
        tasks = [{**job, "position": k} for k, job in enumerate(jobs)]
        self.pool.run(tasks, lambda out: on_result(int(out["position"]), out["result"], float(out["wall_time_s"])),
                      describe=describe_job, in_flight=1)


def check_ray(config: SearchConfig) -> None:
    """Ray missing, or ``config.ray_address`` not answering: one line, before anything loads."""
    require_ray("the search")
    check_reachable(config.ray_address)


def open_pool(config: SearchConfig):
    """The :class:`memaudit.distributed.RayWorkers` pool of ``config.workers`` workers (not started yet); a cluster
    that does not answer or is too small for the workers is one line, and nothing is written."""
    return RayWorkers(config.workers, address=config.ray_address, device=config.device,
                      threads=torch.get_num_threads(), what="the search", name="search")


def on_workers(pool, base, target, config: SearchConfig, proxy, val, cache_dir: str | os.PathLike | None,
               progress: Progress | None) -> _OnWorkers:
    """The :data:`RunJobs` that runs evaluations on ``pool``'s workers, each loading ``base`` (with ``target``'s
    adapters) itself and evaluating on ``proxy`` and ``val``."""
    model_arg = str(Path(base).resolve()) if Path(str(base)).exists() else str(base)
    return _OnWorkers(pool, SearchWorkerSpec(
        base=model_arg, loras=[[a["path"], a["scale"]] for a in target.loras], config=config.to_dict(),
        proxy=_absolute(proxy), val=_absolute(val), device=pool.device_type,
        threads=pool.threads if pool.device_type == "cpu" else None,
        cache_dir=str(latent_cache_root(cache_dir).parent.resolve())), progress)
