"""Sampling whole prompts: :class:`AuditWorker` samples the prompts of a work unit and reduces them to what the
audit keeps, the same code in this process (``--workers 1``, :class:`InProcess`) and in every Ray worker
(``--workers N``, :class:`OnRay` over :class:`~memaudit.distributed.RayWorkers`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from memaudit.attacks.extraction import analyze_prompt
from memaudit.audit.config import AuditConfig, reference_seed, score_window
from memaudit.baselines.rwa import RWAPrompts
from memaudit.baselines.threshold import EmbeddingMitigation
from memaudit.core.provenance import machine
from memaudit.features import get_extractor
from memaudit.images import grid_columns, image_grid, png_bytes
from memaudit.index import as_feature_array, downsample
from memaudit.metrics.alignment import get_scorer
from memaudit.sampling import Sampler, image_seed
from memaudit.target import load_target

__all__ = ["AuditWorker", "InProcess", "OnRay", "WorkerSpec"]


class _PromptBuffer:
    """Holds the (downsampled) generations of prompts until each is complete, then hands them over."""

    def __init__(self, generations: int):
        self.generations, self.parts = generations, {}

    def add(self, prompt: int, generation: int, image: torch.Tensor) -> torch.Tensor | None:
        part = self.parts.setdefault(prompt, {})
        part[generation] = image
        if len(part) == self.generations:
            del self.parts[prompt]
            return torch.stack([part[j] for j in range(self.generations)])
        return None


@dataclass
class WorkerSpec:
    """What a worker process needs to build its own :class:`AuditWorker`: the model to load (a folder or hub id it
    can reach, and adapters ``[[path, scale], ...]``), the audit settings, its device and CPU threads, and whether
    reference generations need quality features."""

    model: str
    loras: list
    config: dict
    device: str
    threads: int | None = None
    quality: bool = False


class AuditWorker:
    """Samples whole prompts and reduces them to what the audit keeps; the same code in this process
    (``--workers 1``) and in every Ray worker.

    :meth:`run_unit` samples the prompts of one work unit (image ``j`` of prompt ``i`` from
    :func:`~memaudit.sampling.image_seed` ``(seed, i, j)``, whatever the unit) and returns, per batch, the guidance
    norms, seeds and image features (and quality features or alignment scores when the audit asks for them), and per
    prompt the extraction attack's clique and medoid (:func:`~memaudit.attacks.extraction.analyze_prompt` without
    the training set: the driver checks the medoid against it), the medoid at the extraction size, and the PNG grid
    of a flagged prompt. Images never leave it otherwise."""

    def __init__(self, target, config: AuditConfig, extractor, q_extractor=None, scorer=None):
        self.target, self.config = target, config
        self.extractor, self.q_extractor, self.scorer = extractor, q_extractor, scorer
        self.sampler = Sampler(target, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                               seed=config.seed, score_window=score_window(config, target),
                               detectors=config.detectors)
        if config.mitigation == "rwa":
            self.sampler.prompt_transform = RWAPrompts(target.tokenizer, k=config.rwa_words)

    @classmethod
    def load(cls, spec: WorkerSpec) -> AuditWorker:
        """Load the model and feature extractors of ``spec`` in this process (a Ray worker)."""
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        config = AuditConfig(**spec.config)
        target = load_target(spec.model, device=spec.device, dtype=config.dtype, loras=spec.loras)
        device = str(target.device)
        extractor = get_extractor(config.features, device=device, **config.feature_options)
        q_extractor = None
        if spec.quality:
            q_extractor = extractor if config.quality_features is None else get_extractor(
                config.quality_features, device=device, **config.quality_feature_options)
        scorer = get_scorer(config.alignment, device=device) if config.alignment else None
        return cls(target, config, extractor, q_extractor, scorer)

    def machine(self) -> str:
        return machine(self.target.device)

    def first_step_norms(self, prompts: list[str]) -> np.ndarray:
        """First-step guidance norms of the reference prompts' images, without mitigation (the ``auto`` target of
        the threshold mitigation)."""
        sampler = self.sampler
        sampler.seed, sampler.embedding_hook = reference_seed(self.config), None
        try:
            return sampler.first_step_norms(prompts, self.config.generations).numpy()
        finally:
            sampler.seed = self.config.seed

    def round_trip(self, images: np.ndarray) -> np.ndarray:
        """Training images ``[k, C, H, W]`` in [-1, 1] through the model's VAE."""
        return self.target.round_trip(torch.from_numpy(images)).float().cpu().numpy()

    def run_unit(self, kind: str, start: int, prompts: list[str], edge_threshold: float,
                 norm_target: float | None = None, progress: Callable[[int], None] | None = None) -> dict:
        """Sample prompts ``start, start + 1, ...`` (``prompts``: their texts) of the ``kind`` list (``audit`` or
        ``reference``, each with its own seed stream) and reduce them; ``norm_target``: the threshold mitigation's
        target (None: none); ``progress(images done)`` after each batch."""
        config, sampler, generations = self.config, self.sampler, self.config.generations
        audited = kind == "audit"
        sampler.seed = config.seed if audited else reference_seed(config)
        hook = None
        if norm_target is not None:
            hook = EmbeddingMitigation(self.target, float(norm_target), lr=config.mitigation_lr,
                                       max_steps=config.mitigation_steps)
        sampler.embedding_hook = hook
        ext_cfg = config.extraction(edge_threshold)
        jobs = [(start + p, j) for p in range(len(prompts)) for j in range(generations)]
        extra_before, detector_before, unet_time = sampler.extra_calls, sampler.detector_calls, 0.0
        batches, per_prompt, shown = [], {}, {}
        buffer = _PromptBuffer(generations)
        for first in range(0, len(jobs), config.batch_size):
            chunk = jobs[first:first + config.batch_size]
            seeds = [image_seed(sampler.seed, i, j) for i, j in chunk]
            asked = [prompts[i - start] for i, _ in chunk]
            used = asked if sampler.prompt_transform is None else [sampler.prompt_transform(p, s)
                                                                   for p, s in zip(asked, seeds)]
            t0 = time.perf_counter()
            images, norms, _, scores = sampler.sample_batch(used, seeds)
            unet_time += time.perf_counter() - t0
            batch = {"prompt_index": np.array([i for i, _ in chunk], dtype=np.int64),
                     "generation": np.array([j for _, j in chunk], dtype=np.int64),
                     "seeds": np.array(seeds, dtype=np.int64), "norms": norms.detach().cpu().numpy(),
                     "features": as_feature_array(self.extractor(images), "generated features")}
            if sampler.prompt_transform is not None:
                batch["prompts_used"] = list(used)
            if scores:
                batch["detectors"] = {name: v.numpy().astype(np.float64) for name, v in scores.items()}
            if self.scorer is not None:
                batch["alignment"] = np.asarray(self.scorer(images, asked), dtype=np.float64)
            if not audited and self.q_extractor is not None:
                batch["q_features"] = self.q_extractor(images).detach().cpu().numpy()
            batches.append(batch)
            small = downsample(images, config.extraction_size)
            for k, (i, j) in enumerate(chunk):
                if audited and j < config.max_grid:
                    shown.setdefault(i, {})[j] = images[k]
                done = buffer.add(i, j, small[k])
                if done is None:
                    continue
                if audited:
                    verdict = analyze_prompt(done, ext_cfg, None)  # the clique; the driver checks the medoid
                    per_prompt[i] = {"verdict": verdict.to_dict(), "medoid_image": None if verdict.medoid is None
                                     else done[verdict.medoid].numpy().copy(),
                                     **self._grid(verdict, shown.pop(i))}
                elif config.calibrate_edge:
                    per_prompt[i] = {"small": done.numpy()}
            if progress is not None:
                progress(first + len(chunk))
        out = {"kind": kind, "start": start, "stop": start + len(prompts), "batches": batches, "prompts": per_prompt,
               "extra_calls": sampler.extra_calls - extra_before, "unet_time_s": unet_time,
               "detector_calls": sampler.detector_calls - detector_before}
        if hook is not None:
            out["mitigation"] = {"before": torch.cat(hook.before).numpy(), "after": torch.cat(hook.after).numpy(),
                                 "steps": [int(s) for s in hook.steps]}
        return out

    def _grid(self, verdict, shown: dict) -> dict:
        """The grid of a flagged prompt's generations (its clique first) as PNG bytes, at the grid's scale."""
        if not verdict.flagged:
            return {"grid": None, "grid_columns": None}
        clique = set(verdict.clique)
        order = list(verdict.clique) + [g for g in sorted(shown) if g not in clique]
        order = [g for g in order if g in shown][: self.config.max_grid]
        columns = grid_columns(len(order))
        grid = image_grid(torch.stack([shown[g] for g in order]), columns=columns)
        return {"grid": png_bytes(grid, tile=self.target.resolution), "grid_columns": columns}


class InProcess:
    """The audit's own process as its one worker (``--workers 1``)."""

    def __init__(self, worker: AuditWorker):
        self.worker = worker
        self.machine = worker.machine()

    def run(self, tasks: list[dict], on_output: Callable[[dict], None], on_batch: Callable[[dict, int], None],
            describe: Callable[[dict], str]) -> None:
        for task in tasks:
            on_output(self.worker.run_unit(**task, progress=lambda done, task=task: on_batch(task, done)))

    def first_step_norms(self, prompts: list[str]) -> np.ndarray:
        return self.worker.first_step_norms(prompts)

    def round_trip(self, images: np.ndarray) -> np.ndarray:
        return self.worker.round_trip(images)


class OnRay:
    """The audit's workers on Ray (``--workers N``): :class:`~memaudit.distributed.RayWorkers` holding one
    :class:`AuditWorker` per actor, with the calls of :class:`InProcess`."""

    def __init__(self, pool):
        self.pool, self.machine = pool, pool.machine

    def run(self, tasks: list[dict], on_output: Callable[[dict], None], on_batch: Callable[[dict, int], None],
            describe: Callable[[dict], str]) -> None:
        self.pool.run(tasks, on_output, describe=describe, keywords=True)

    def first_step_norms(self, prompts: list[str]) -> np.ndarray:
        return self.pool.call("first_step_norms", prompts, what="the mitigation target")

    def round_trip(self, images: np.ndarray) -> np.ndarray:
        return self.pool.call("round_trip", images, what="the VAE round trip of a training image")

    def close(self) -> None:
        pass
