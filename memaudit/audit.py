"""``memaudit audit``: which training images does a model reproduce? One sampling pass, three measures.

1. Sample ``generations`` images per prompt with the :class:`~memaudit.sampling.Sampler`; the guidance norms it
   records give every prompt's denoising strength (Wen et al.) at no extra UNet cost.
2. As batches stream in: features of each image against a faiss index of the training set give AMD (mean over
   images of the minimum cosine distance to the training set); once a prompt's generations are complete, the
   extraction attack (Carlini et al.) looks for a large clique of near-identical generations and checks its medoid
   against the training set.
3. Reference prompts known not to be memorized (optional) calibrate the denoising threshold at a chosen
   false-positive rate; the extraction verdicts label prompts for an ROC of the denoising score.

Results go to ``out/`` atomically: ``results.json`` (schema in :mod:`memaudit.report`), PNG grids of flagged
prompts, the nearest training images (never with ``redact``), and ``report.html``. Nothing is written until every
input has been checked; a failed run leaves an earlier ``out/`` untouched.

Work units and the journal. Prompts are sampled in work units of whole prompts (:func:`unit_prompts`: as many as
make the sampler's batches exactly those of one pass over every prompt), and each unit is reduced by
:meth:`AuditWorker.run_unit` to what the audit keeps of it: guidance norms, image features, the clique part of the
extraction verdict with its medoid, and the grid of a flagged prompt. The same method runs in this process
(``workers=1``) and in every Ray worker (``workers>1``, :mod:`memaudit.distributed`); the driver owns the faiss index,
the medoid lookup, the journal and every file. While an audit runs, each finished unit is appended to a journal in
``OUT.partial/`` (:class:`AuditJournal`): running the same audit again after a crash or Ctrl-C takes every journaled
prompt from it and samples only the others, and ends with the same ``results.json``; other settings, model, data or
prompts are refused. ``OUT.partial/`` is deleted when ``out/`` is complete. With ``redact`` the journal holds no
grid of an extracted prompt and no image features (only distances), and it is deleted at the end like the rest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from memaudit.attacks.denoising import image_scores, prompt_scores
from memaudit.attacks.extraction import ExtractionConfig
from memaudit.core.digests import tree_digest
from memaudit.core.errors import ConfigError, DataError
from memaudit.core.io import check_writable, default_cache_dir
from memaudit.core.outputs import (
    check_cache,
    check_clear,
    check_output,
    check_partial,
    dataset_inputs,
    output_directory,
    partial_dir,
)
from memaudit.core.provenance import machine, versions
from memaudit.core.runs import differences, listed

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: Generations per prompt the extraction attack's exact clique search takes.
MAX_GENERATIONS = ExtractionConfig.__dataclass_fields__["max_clique_nodes"].default


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class AuditConfig:
    """Settings of an audit; each field's ``help`` metadata documents it."""

    generations: int = _help("images per prompt (Carlini et al. use 500)", default=16)
    steps: int = _help("denoising steps per image", default=25)
    guidance: float = _help("classifier-free guidance scale", default=7.5)
    batch_size: int = _help("images per UNet batch", default=16)
    seed: int = _help("seed of every generation", default=0)
    features: str = _help("feature space of AMD: pixels, open_clip, torchscript, inception", default="pixels")
    feature_options: dict = _help("options of the feature extractor (e.g. weights=PATH)", default_factory=dict)
    tiles: int = _help("extraction attack: tiles per side for the max-over-tiles L2", default=4)
    edge_threshold: float = _help("extraction attack: tiled distance under which two generations are joined", default=0.10)
    min_clique: int = _help("extraction attack: flag a prompt when its largest clique has at least this many members", default=10)
    delta: float = _help("extraction attack: extracted when the medoid is within this normalized L2 of a training image", default=0.15)
    extraction_size: int = _help("compare generations at most at this side length (bounds memory)", default=64)
    calibrate_edge: bool = _help("set the edge threshold from the reference prompts' generations", default=False)
    edge_quantile: float = _help("quantile of reference within-prompt distances used as edge threshold", default=0.001)
    denoising_window: tuple = _help("steps [start, stop) the denoising score averages over (stop None: all)", default=(0, None))
    denoising_generations: int | None = _help("generations per prompt the denoising score averages over (None: all)", default=None)
    fpr: float = _help("false-positive rate at which the denoising threshold is calibrated", default=0.01)
    max_grid: int = _help("generations shown per flagged prompt in the report", default=16)
    redact: bool = _help("leave every training-image pixel out of the outputs", default=False)
    cache_dir: str | None = _help("folder of the training-feature index cache, outside the output folder (default: "
                                  "$MEMAUDIT_CACHE_DIR, else ~/.cache/memaudit)", default=None)
    device: str = _help("auto, cpu or cuda", default="auto")
    dtype: str = _help("float32, float16 or bfloat16", default="float32")
    loras: list = _help("LoRA adapters applied to the model before the audit: [[path, scale], ...]",
                        default_factory=list)
    mitigation: str = _help("inference-time mitigation during sampling: none, rwa (random words in every prompt) or "
                            "threshold (prompt-embedding optimization before sampling)", default="none")
    rwa_words: int = _help("rwa: random tokens inserted in every prompt", default=2)
    mitigation_target: float | str = _help("threshold: per-image first-step guidance norm to optimize under, or auto "
                                           "(the median over the reference prompts' images)", default="auto")
    mitigation_steps: int = _help("threshold: at most this many AdamW steps on the prompt embedding", default=10)
    mitigation_lr: float = _help("threshold: AdamW learning rate of the prompt-embedding optimization", default=0.05)
    quality_features: str | None = _help("feature space of KID/FID (default: the AMD feature space)", default=None)
    quality_feature_options: dict = _help("options of the quality feature extractor", default_factory=dict)
    alignment: str | None = _help("text-image alignment scorer (e.g. demo); none when unset", default=None)
    kid_subsets: int = _help("KID: random subsets averaged over", default=100)
    workers: int = _help("sample on this many Ray workers, one model replica each (1: in this process, without "
                         "Ray); the results are the same", default=1)
    ray_address: str | None = _help("Ray cluster of the workers (as `ray start --head` prints it); None: a local Ray "
                                    "instance", default=None)

    def __post_init__(self):
        self.denoising_window = tuple(self.denoising_window)
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1 (1 runs the audit in this process).")
        if self.ray_address is not None and self.workers == 1:
            raise ConfigError("--ray-address needs --workers 2 or more: one worker runs in this process, without Ray.")
        checks = [
            (self.generations >= 1, "generations must be at least 1"),
            (self.generations <= MAX_GENERATIONS, f"--generations is at most {MAX_GENERATIONS} (the exact clique "
             "search's limit per prompt; Carlini et al. use 500)"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.tiles >= 1, "tiles must be at least 1"),
            (self.edge_threshold > 0, "edge threshold must be positive"),
            (self.min_clique >= 2, "min clique must be at least 2"),
            (self.delta > 0, "delta must be positive"),
            (self.extraction_size >= self.tiles, "extraction size must be at least the number of tiles"),
            (0 < self.fpr < 1, "fpr must be between 0 and 1"),
            (0 <= self.edge_quantile < 1, "edge quantile must be in [0, 1)"),
            (self.denoising_generations is None or self.denoising_generations >= 1,
             "denoising generations must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"audit setting invalid: {msg}.")
        if self.mitigation not in ("none", "rwa", "threshold"):
            raise ConfigError(f"--mitigation {self.mitigation!r} is not known; use none, rwa or threshold.")
        if isinstance(self.mitigation_target, str) and self.mitigation_target != "auto":
            try:
                self.mitigation_target = float(self.mitigation_target)
            except ValueError:
                raise ConfigError(f"--mitigation-target must be a number or auto (got {self.mitigation_target!r}).") from None
        if not isinstance(self.mitigation_target, str) and not self.mitigation_target > 0:
            raise ConfigError(f"--mitigation-target must be positive (got {self.mitigation_target!r}).")
        if self.mitigation_steps < 0 or not self.mitigation_lr > 0 or self.rwa_words < 0 or self.kid_subsets < 1:
            raise ConfigError("audit setting invalid: mitigation steps and rwa words must be >= 0, mitigation lr > 0, "
                              "kid subsets >= 1.")
        if self.min_clique > self.generations:
            raise ConfigError(f"min clique ({self.min_clique}) is larger than the generations per prompt "
                              f"({self.generations}), so nothing could be flagged; raise --generations or lower --min-clique.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line), ``.csv`` or ``.jsonl`` (a ``prompt`` or ``caption`` field)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompts file {path} is a folder; pass a .txt (one prompt per line), .csv or .jsonl file.")
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist; pass a .txt (one prompt per line), .csv or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompts file {path} is not UTF-8 text; save it as UTF-8.") from e
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names: an unquoted comma cut the prompt
                raise DataError(f"prompts file {path} line {reader.line_num} has more fields than its header; a prompt "
                                'that contains a comma must be quoted, e.g. "a red car, parked".')
            rows.append(row)
        key = next((k for k in ("prompt", "caption") if rows and k in rows[0]), None)
        if rows and key is None:
            raise DataError(f"prompts file {path} has no 'prompt' or 'caption' column (found: {', '.join(rows[0])}).")
        prompts = [r[key].strip() for r in rows] if rows else []
    elif path.suffix.lower() == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"prompts file {path} line {n} is not valid JSON ({e.msg}).") from e
            value = obj.get("prompt", obj.get("caption")) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise DataError(f"prompts file {path} line {n} has no 'prompt' or 'caption' string.")
            prompts.append(value.strip())
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts; put one prompt per line.")
    return prompts


def cache_key(dataset, what: str) -> str:
    """Key of something computed from every training image (``what`` says what and how): from the dataset's
    :meth:`~memaudit.data.ImageCaptionDataset.content_key`, so no pixel is read to find a cached index."""
    return hashlib.sha256(f"{dataset.content_key()}|{what}".encode()).hexdigest()[:16]


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


# -- work units ----------------------------------------------------------------------------------------------------

#: the most prompts in a work unit that keeps the batches of one pass over every prompt (see :func:`unit_prompts`)
MAX_UNIT_PROMPTS = 16


def unit_prompts(generations: int, batch_size: int) -> int:
    """Prompts per work unit: the fewest whose images fill whole batches (``batch_size / gcd(generations,
    batch_size)``), so that every batch is the one a single pass over all prompts would sample, whatever the unit
    runs on and whenever; when that is more than :data:`MAX_UNIT_PROMPTS`, as many prompts as fit in one batch (at
    least one). Images do not depend on their batch in exact arithmetic, but a batch's floating-point rounding can:
    fixed units make every image the same bit for bit, in one process, on many workers or resumed."""
    k = batch_size // math.gcd(generations, batch_size)
    return k if k <= MAX_UNIT_PROMPTS else max(1, batch_size // generations)


def work_units(n_prompts: int, per_unit: int) -> list[tuple[int, int]]:
    """``[start, stop)`` prompt ranges of the work units, in prompt order."""
    return [(s, min(n_prompts, s + per_unit)) for s in range(0, n_prompts, per_unit)]


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
        from memaudit.sampling import Sampler

        self.target, self.config = target, config
        self.extractor, self.q_extractor, self.scorer = extractor, q_extractor, scorer
        self.sampler = Sampler(target, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                               seed=config.seed, score_window=score_window(config, target))
        if config.mitigation == "rwa":
            from memaudit.baselines.rwa import RWAPrompts

            self.sampler.prompt_transform = RWAPrompts(target.tokenizer, k=config.rwa_words)

    @classmethod
    def load(cls, spec: WorkerSpec) -> AuditWorker:
        """Load the model and feature extractors of ``spec`` in this process (a Ray worker)."""
        from memaudit.features import get_extractor
        from memaudit.metrics.alignment import get_scorer
        from memaudit.target import load_target

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
        from memaudit.attacks.extraction import analyze_prompt
        from memaudit.lookup import downsample
        from memaudit.neighbors import as_feature_array
        from memaudit.sampling import image_seed

        config, sampler, generations = self.config, self.sampler, self.config.generations
        audited = kind == "audit"
        sampler.seed = config.seed if audited else reference_seed(config)
        hook = None
        if norm_target is not None:
            from memaudit.baselines.threshold import EmbeddingMitigation

            hook = EmbeddingMitigation(self.target, float(norm_target), lr=config.mitigation_lr,
                                       max_steps=config.mitigation_steps)
        sampler.embedding_hook = hook
        ext_cfg = ExtractionConfig(tiles=config.tiles, edge_threshold=edge_threshold, min_clique=config.min_clique,
                                   delta=config.delta)
        jobs = [(start + p, j) for p in range(len(prompts)) for j in range(generations)]
        extra_before, unet_time = sampler.extra_calls, 0.0
        batches, per_prompt, shown = [], {}, {}
        buffer = _PromptBuffer(generations)
        for first in range(0, len(jobs), config.batch_size):
            chunk = jobs[first:first + config.batch_size]
            seeds = [image_seed(sampler.seed, i, j) for i, j in chunk]
            asked = [prompts[i - start] for i, _ in chunk]
            used = asked if sampler.prompt_transform is None else [sampler.prompt_transform(p, s)
                                                                   for p, s in zip(asked, seeds)]
            t0 = time.perf_counter()
            images, norms, _ = sampler.sample_batch(used, seeds)
            unet_time += time.perf_counter() - t0
            batch = {"prompt_index": np.array([i for i, _ in chunk], dtype=np.int64),
                     "generation": np.array([j for _, j in chunk], dtype=np.int64),
                     "seeds": np.array(seeds, dtype=np.int64), "norms": norms.detach().cpu().numpy(),
                     "features": as_feature_array(self.extractor(images), "generated features")}
            if sampler.prompt_transform is not None:
                batch["prompts_used"] = list(used)
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
               "extra_calls": sampler.extra_calls - extra_before, "unet_time_s": unet_time}
        if hook is not None:
            out["mitigation"] = {"before": torch.cat(hook.before).numpy(), "after": torch.cat(hook.after).numpy(),
                                 "steps": [int(s) for s in hook.steps]}
        return out

    def _grid(self, verdict, shown: dict) -> dict:
        """The grid of a flagged prompt's generations (its clique first) as PNG bytes, at the grid's scale."""
        from memaudit.images import grid_columns, image_grid, png_bytes

        if not verdict.flagged:
            return {"grid": None, "grid_columns": None}
        clique = set(verdict.clique)
        order = list(verdict.clique) + [g for g in sorted(shown) if g not in clique]
        order = [g for g in order if g in shown][: self.config.max_grid]
        columns = grid_columns(len(order))
        grid = image_grid(torch.stack([shown[g] for g in order]), columns=columns)
        return {"grid": png_bytes(grid, tile=self.target.resolution), "grid_columns": columns}


class _InProcess:
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


class _OnRay:
    """The audit's workers on Ray (``--workers N``): :class:`~memaudit.distributed.RayWorkers` holding one
    :class:`AuditWorker` per actor, with the calls of :class:`_InProcess`."""

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


# -- the journal ---------------------------------------------------------------------------------------------------

JOURNAL_KIND = "memaudit.audit.journal"
JOURNAL_VERSION = 1


def journal_dir(out: str | Path) -> Path:
    """Where an unfinished audit of ``out`` keeps its journal: ``OUT.partial/`` (as an unfinished fine-tune)."""

    return partial_dir(out)


class AuditJournal:
    """The finished work units of an unfinished audit, in ``OUT.partial/``:

    * ``run.json``: the audit's identity (model and adapters, training and held-out data, prompts, device type and
      every setting that changes a result; not the workers, threads, Ray address or cache folder) and the prompt
      counts;
    * ``units/<kind>-<start>.npz``: one unit's arrays (norms, seeds, AMD distances and nearest training rows, quality
      features and alignment scores when asked for), written atomically before its line;
    * ``grids/prompt-<i>.png``: the grid of a flagged prompt (none for a withheld one), likewise;
    * ``journal.jsonl``: one line per finished unit (its small fields: verdicts, prompts used, ...) or computed value
      (the threshold mitigation's target), appended and fsynced. A line cut short by a crash is dropped, with every
      line after it, and those units are sampled again.
    """

    def __init__(self, folder: Path, identity: dict, counts: dict):
        self.folder, self.identity, self.counts = Path(folder), identity, counts
        self.lines_path = self.folder / "journal.jsonl"
        self.units: dict[tuple[str, int], dict] = {}
        self.values: dict[str, dict] = {}
        self._good_bytes = None
        run_file = self.folder / "run.json"
        if run_file.is_file():
            try:
                earlier = json.loads(run_file.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                earlier = None
            if not isinstance(earlier, dict) or earlier.get("kind") != JOURNAL_KIND:
                raise ConfigError(f"{self.folder} is not the journal of an unfinished audit; move or delete it, or "
                                  "pass another --out.")
            if earlier.get("identity") != identity or earlier.get("version") != JOURNAL_VERSION:
                changed = _differences(earlier.get("identity") or {}, identity)
                raise ConfigError(f"{self.folder} holds an unfinished audit with other {changed}; run the same command "
                                  f"as before to resume it, or delete {self.folder} to start over.")
            self._read()

    @staticmethod
    def check_resume(folder: Path, known: dict) -> None:
        """Refuse (one line) to resume a journal in ``folder`` whose identity differs in what is ``known`` before
        the model loads: the settings and the model folder's content."""
        try:
            earlier = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8")).get("identity") or {}
        except (OSError, ValueError, AttributeError):
            return  # no journal (or not one of ours: the constructor says so)
        if earlier.get("settings") != known["settings"]:
            raise ConfigError(f"{folder} holds an unfinished audit with other {_differences(earlier, known)}; run the "
                              f"same command as before to resume it, or delete {folder} to start over.")
        if known["model_sha256"] is not None and earlier.get("model_sha256") != known["model_sha256"]:
            raise ConfigError(f"{folder} holds an unfinished audit of {earlier.get('model')} as it was before its "
                              f"files changed; delete {folder} to audit the model as it is now.")

    @property
    def exists(self) -> bool:
        return (self.folder / "run.json").is_file()

    def _read(self) -> None:
        if not self.lines_path.is_file():
            self._good_bytes = 0
            return
        data = self.lines_path.read_bytes()
        good = 0
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is a torn line (or nothing)
            try:
                item = json.loads(line)
                if item["type"] == "unit":
                    self._read_unit(item)
                elif item["type"] == "value":
                    self.values.setdefault(item["name"], item["value"])
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("%s: dropping the journal from a damaged line on (%s); those prompts are sampled again",
                               self.lines_path, e)
                break
            good += len(line) + 1
        if good < len(data):
            logger.info("%s: dropping %d bytes of an unfinished line", self.lines_path, len(data) - good)
        self._good_bytes = good

    def _read_unit(self, item: dict) -> None:
        """Take a journaled unit whose files are all there and hold what was written (their SHA-256 in its line);
        one whose files are missing or changed is left out, and its prompts are sampled again."""
        key = (item["kind"], int(item["start"]))
        if key in self.units:
            return
        files = {item["arrays"]: (item.get("sha256") or {}).get(item["arrays"])}
        files.update({self.grid_file(i): (item.get("sha256") or {}).get(self.grid_file(i))
                      for i, g in zip(range(int(item["start"]), int(item["stop"])), item.get("grids") or [])
                      if g is not None and not g.get("withheld")})
        try:
            contents = {rel: (self.folder / rel).read_bytes() for rel in files}
            bad = [rel for rel, digest in files.items()
                   if digest is not None and hashlib.sha256(contents[rel]).hexdigest() != digest]
            if bad:
                raise ValueError(f"{bad[0]} does not hold what was written")
            with np.load(io.BytesIO(contents[item["arrays"]]), allow_pickle=False) as f:
                item["arrays"] = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            logger.warning("%s: %s prompts %d to %d are sampled again (%s)", self.folder, item["kind"],
                           int(item["start"]), int(item["stop"]) - 1, e)
            return
        self.units[key] = item

    def begin(self) -> None:
        """Create the journal (or cut a torn last line off the one found) before the first unit is added."""
        if not self.exists:
            from memaudit.core.io import atomic_write_json

            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / "run.json", {"kind": JOURNAL_KIND, "version": JOURNAL_VERSION,
                                                         "identity": self.identity, **self.counts})
        elif self._good_bytes is not None and self.lines_path.is_file() and \
                self.lines_path.stat().st_size > self._good_bytes:
            os.truncate(self.lines_path, self._good_bytes)

    def has(self, kind: str, start: int) -> bool:
        return (kind, start) in self.units

    def unit(self, kind: str, start: int) -> dict:
        return self.units[(kind, start)]

    def add_unit(self, meta: dict, arrays: dict[str, np.ndarray], grids: dict[int, bytes]) -> dict:
        """Journal a finished unit: its grid PNGs and arrays (atomically), then its line; returns the record as a
        resumed audit reads it back."""
        from memaudit.core.io import atomic_write_bytes

        digests = {}
        for i, png in grids.items():
            atomic_write_bytes(self.folder / self.grid_file(i), png)
            digests[self.grid_file(i)] = hashlib.sha256(png).hexdigest()
        rel = f"units/{meta['kind']}-{meta['start']:06d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.folder / rel, buf.getvalue())
        digests[rel] = hashlib.sha256(buf.getvalue()).hexdigest()
        line = {"type": "unit", **meta, "arrays": rel, "sha256": digests}
        self._append(line)
        record = json.loads(json.dumps(line))
        record["arrays"] = arrays
        self.units[(meta["kind"], meta["start"])] = record
        return record

    def add_value(self, name: str, value: dict) -> None:
        self._append({"type": "value", "name": name, "value": value})
        self.values[name] = json.loads(json.dumps(value))

    @staticmethod
    def grid_file(prompt: int) -> str:
        return f"grids/prompt-{prompt:05d}.png"

    def _append(self, line: dict) -> None:
        with open(self.lines_path, "ab") as f:
            f.write((json.dumps(line) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


#: the parts of an audit's identity, as a refusal names them
IDENTITY_PARTS = {"model_sha256": "the model's files", "heldout": "held-out data",
                  "reference_prompts": "reference prompts", "convert_channels": "--convert-channels"}


def _differences(earlier: dict, now: dict) -> str:
    """What differs between two identities, for the message: settings by name, the rest by what they are."""
    names = differences(earlier, now, parts=IDENTITY_PARTS)
    if not names:
        return "settings (a journal of another memaudit version)"
    return f"settings, model, data or prompts ({listed(names)})"


def journal_kept(out: str | Path) -> str | None:
    """What an interrupted audit of ``out`` has kept, in a sentence (None: nothing); for the Ctrl-C message."""
    folder = journal_dir(out)
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        lines = (folder / "journal.jsonl").read_bytes().split(b"\n")[:-1] if (folder / "journal.jsonl").is_file() else []
    except (OSError, ValueError):
        return None
    done = {"audit": 0, "reference": 0}
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            break
        if item.get("type") == "unit":
            done[item["kind"]] += int(item["stop"]) - int(item["start"])
    text = f"Kept {done['audit']} of {info.get('prompts')} prompts"
    if info.get("reference_prompts"):
        text += f" and {done['reference']} of {info['reference_prompts']} reference prompts"
    return text + f" in {folder}; none is sampled again."


def audit_inputs(model, train, heldout, prompts, reference_prompts, loras, cache_root) -> list[tuple[str, object]]:
    """What an audit reads, named as the user gave it, for :func:`memaudit.core.outputs.check_output`."""
    named = [("the model", model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)),
             ("--train", train if isinstance(train, (str, os.PathLike)) else None),
             ("--heldout", heldout if isinstance(heldout, (str, os.PathLike)) else None),
             ("--prompts", prompts if isinstance(prompts, (str, os.PathLike)) else None),
             ("--reference-prompts", reference_prompts if isinstance(reference_prompts, (str, os.PathLike)) else None),
             ("--cache-dir", cache_root)]
    return named + [("--lora", lora[0]) for lora in loras]


def _digest(items: list[str]) -> dict:
    return {"count": len(items), "sha256": hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()}


#: settings that do not change a result: a journal of any of them resumes with any other
NOT_IN_IDENTITY = ("workers", "ray_address", "cache_dir", "device", "loras")


def _model_id(model) -> str:
    return str(Path(model).resolve()) if Path(str(model)).exists() else str(model)


def model_digest(model) -> str | None:
    """The content of a model folder (SHA-256 over its files, :func:`memaudit.core.digests.tree_digest`): a model
    re-fine-tuned in place is another model. None for a hub id or an in-memory model."""
    if not isinstance(model, (str, os.PathLike)) or not str(model) or not Path(model).is_dir():
        return None
    return tree_digest(model)


def identity_settings(config: AuditConfig) -> dict:
    """The settings that change a result (not :data:`NOT_IN_IDENTITY`), as they read back from run.json."""
    return {k: v for k, v in json.loads(json.dumps(config.to_dict(), default=str)).items() if k not in NOT_IN_IDENTITY}


def _identity(model_id: str, model_sha256: str | None, target, dataset, held, convert_channels: bool,
              prompts: list[str], reference: list[str], config: AuditConfig, device_type: str) -> dict:
    """What must match for an audit to resume another's journal."""
    return {"model": model_id, "model_sha256": model_sha256, "family": target.family.name,
            "adapters": [{"path": a["path"], "sha256": a["sha256"], "scale": a["scale"]} for a in target.loras],
            "train": dataset.content_key(captions=True), "convert_channels": bool(convert_channels),
            "heldout": held.content_key(captions=True) if held is not None else None,
            "prompts": _digest(prompts), "reference_prompts": _digest(reference), "device": device_type,
            "settings": identity_settings(config)}


# -- the driver ----------------------------------------------------------------------------------------------------


def _complete_verdict(partial: dict, medoid_image, lookup, own_index: int | None, delta: float):
    """The extraction verdict of a prompt from the worker's clique part: its medoid checked against the training set
    (the prompt's own image when its caption is a training caption, else the nearest), exactly as
    :func:`~memaudit.attacks.extraction.analyze_prompt` does with the lookup."""
    from memaudit.attacks.extraction import PromptVerdict

    verdict = PromptVerdict(**partial)
    if medoid_image is not None:
        g = torch.from_numpy(np.array(medoid_image))  # a copy: what comes from Ray is read-only
        if own_index is not None:
            verdict.nearest_train_index = int(own_index)
            verdict.nearest_train_distance = float(lookup.distance(g, int(own_index)))
        else:
            index, distance = lookup.nearest(g)
            verdict.nearest_train_index, verdict.nearest_train_distance = int(index), float(distance)
    verdict.extracted = bool(verdict.flagged and verdict.nearest_train_distance is not None
                             and verdict.nearest_train_distance < delta)
    return verdict


class _Units:
    """The driver's side of the work units: reduces each unit a worker returns against the training set (AMD
    distances, the medoid check, grids withheld under ``redact``), journals it, and reports progress."""

    def __init__(self, journal: AuditJournal, index, lookup, config: AuditConfig, own_of: dict, progress: Progress):
        self.journal, self.index, self.lookup, self.config = journal, index, lookup, config
        self.own_of, self.progress = own_of, progress
        self.resumed: dict[str, int] = {}  # kind -> prompts taken from the journal

    def run(self, executor, kind: str, prompts: list[str], stage: str, edge_threshold: float,
            norm_target: float | None) -> list[dict]:
        """Every unit of ``prompts`` (from the journal, or sampled now), in prompt order."""
        generations = self.config.generations
        units = work_units(len(prompts), unit_prompts(generations, self.config.batch_size))
        total = len(prompts) * generations
        done = [sum((b - a) * generations for a, b in units if self.journal.has(kind, a))]
        todo = [{"kind": kind, "start": a, "prompts": prompts[a:b], "edge_threshold": float(edge_threshold),
                 "norm_target": norm_target} for a, b in units if not self.journal.has(kind, a)]
        self.resumed[kind] = sum(b - a for a, b in units if self.journal.has(kind, a))
        if done[0]:
            logger.info("%s: %d of %d images taken from the journal in %s", stage, done[0], total, self.journal.folder)
        self.progress(stage, done[0], total)

        def on_output(output: dict) -> None:
            self._finish(output, prompts)
            done[0] += (output["stop"] - output["start"]) * generations
            self.progress(stage, done[0], total)

        def on_batch(task: dict, images: int) -> None:  # a unit's last image counts once it is journaled
            if images < len(task["prompts"]) * generations:
                self.progress(stage, done[0] + images, total)

        def describe(task: dict) -> str:
            a, n = task["start"], len(task["prompts"])
            which = "reference prompt" if kind == "reference" else "prompt"
            span = f"{which} {a}" if n == 1 else f"{which}s {a} to {a + n - 1}"
            return f"{span} ({task['prompts'][0]!r}{', ...' if n > 1 else ''})"

        if todo:
            executor.run(todo, on_output, on_batch, describe)
        return [self.journal.unit(kind, a) for a, _ in units]

    def _finish(self, output: dict, prompts: list[str]) -> dict:
        from memaudit.metrics.amd import AMDAccumulator

        config, kind = self.config, output["kind"]
        batches = output["batches"]
        acc = AMDAccumulator(self.index)
        for b in batches:  # batch by batch, as the features came: faiss's rounding may depend on the query count
            acc.update(b["features"])
        amd = acc.result()
        arrays = {name: np.concatenate([b[name] for b in batches])
                  for name in ("prompt_index", "generation", "seeds", "norms")}
        arrays["distances"], arrays["nearest"] = amd.per_image, amd.nearest
        for name in ("alignment", "q_features"):
            if name in batches[0]:
                arrays[name] = np.concatenate([b[name] for b in batches])
        meta = {"kind": kind, "start": int(output["start"]), "stop": int(output["stop"]),
                "extra_calls": int(output["extra_calls"]), "unet_time_s": float(output["unet_time_s"]),
                "prompts_used": [p for b in batches for p in b["prompts_used"]] if "prompts_used" in batches[0] else None}
        if "mitigation" in output:
            arrays["mitigation_before"] = np.array(output["mitigation"]["before"])
            arrays["mitigation_after"] = np.array(output["mitigation"]["after"])
            meta["mitigation_steps"] = [int(s) for s in output["mitigation"]["steps"]]
        grids = {}
        if kind == "audit":
            verdicts, shown = [], []
            for i in range(output["start"], output["stop"]):
                item = output["prompts"][i]
                verdict = _complete_verdict(item["verdict"], item["medoid_image"], self.lookup,
                                            self.own_of.get(prompts[i]), config.delta)
                verdicts.append(verdict.to_dict())
                if verdict.flagged and config.redact and verdict.extracted:
                    shown.append({"withheld": True})  # matched to a training image: the generations are one
                elif verdict.flagged:
                    grids[i] = item["grid"]
                    shown.append({"columns": int(item["grid_columns"])})
                else:
                    shown.append(None)
            meta["verdicts"], meta["grids"] = verdicts, shown
        elif config.calibrate_edge:
            arrays["small"] = np.stack([output["prompts"][i]["small"] for i in range(output["start"], output["stop"])])
        return self.journal.add_unit(meta, arrays, grids)


def run_audit(model, train, out: str | Path, prompts: Sequence[str] | str | Path | None = None,
              reference_prompts: Sequence[str] | str | Path | None = None, config: AuditConfig | None = None,
              progress: Progress | None = None, convert_channels: bool = False, heldout=None) -> dict:
    """Audit ``model`` (a folder, hub id in the cache, or a :class:`~memaudit.target.Target`) against ``train``
    (a folder/captions file or an :class:`~memaudit.data.ImageCaptionDataset`). Returns the results dict that is
    also written to ``out/results.json``.

    ``heldout`` (optional, same forms as ``train``): images and captions of the same domain that were *not* trained
    on. Its captions are the reference prompts (unless ``reference_prompts`` is given), and the generations for them
    are compared with its images for quality (KID and FID in ``config.quality_features``).

    ``config.workers > 1`` samples on that many Ray workers (:mod:`memaudit.distributed`; the model must then be a
    folder or hub id every worker can load). Finished prompts are journaled in ``OUT.partial/``
    (:class:`AuditJournal`); the same call after a crash or interruption continues from there."""
    from memaudit.attacks.extraction import calibrate_edge_threshold
    from memaudit.core.io import atomic_write_bytes
    from memaudit.data import dataset_for_target
    from memaudit.features import get_extractor
    from memaudit.images import png_bytes
    from memaudit.metrics.alignment import get_scorer
    from memaudit.metrics.amd import AMDResult
    from memaudit.report import write_report, write_results
    from memaudit.sampling import IMAGE_SEED_FORMULA
    from memaudit.target import Target, load_target

    config = config or AuditConfig()
    progress = progress or (lambda *_: None)
    started = time.perf_counter()
    # the training-feature index is kept outside the output folder, which users share
    cache_root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    cache_dir = check_writable(cache_root / "features", "--cache-dir")
    # prompt files need no model: a mistake in them stops before it loads
    given_prompts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else None
    given_reference = read_prompts(reference_prompts) if isinstance(reference_prompts, (str, Path)) else None
    # nothing the user gave is written over: refused before anything loads
    inputs = audit_inputs(model, train, heldout, prompts, reference_prompts, config.loras, cache_root)
    out = check_output(out, "audit", inputs, partial=journal_dir(out))
    check_cache(cache_root, inputs)
    check_partial(journal_dir(out), "run.json", "the audit")
    # a resume with other settings, or of a model whose files changed, stops here, before the model loads
    model_sha256 = model_digest(model)
    AuditJournal.check_resume(journal_dir(out), {"settings": identity_settings(config), "model_sha256": model_sha256})
    distributed = config.workers > 1
    if distributed:
        from memaudit.distributed import require_ray

        require_ray()  # missing: one line naming the extra, before anything loads
        if isinstance(model, Target):
            raise ConfigError("--workers > 1 loads the model in every worker: pass its folder (or hub id), not a "
                              "loaded Target.")

    # -- check every input before writing anything ---------------------------------------------------------------
    progress("loading model", 0, 1)
    # with workers, this copy only answers questions about the model (its family, resolution, ...): on the CPU
    target = model if isinstance(model, Target) else load_target(model, device="cpu" if distributed else config.device,
                                                                 dtype=config.dtype, loras=config.loras)
    # where this process computes features (of the training set, the held-out images)
    here = _driver_device(config) if distributed else str(target.device)
    dataset, train_source = dataset_for_target(train, target, convert_channels)
    held, heldout_source = dataset_for_target(heldout, target, convert_channels) if heldout is not None else (None, None)
    images_in = dataset_inputs(dataset, "the training images") + dataset_inputs(held, "the held-out images")
    check_clear(out, images_in)  # a captions file can name images anywhere
    check_clear(journal_dir(out), images_in, "--out's work folder")
    if given_prompts is not None:
        prompt_list, prompts_source = given_prompts, str(prompts)
    elif prompts is None:
        prompt_list, prompts_source = list(dict.fromkeys(dataset.captions)), "training captions"
    else:
        prompt_list, prompts_source = [str(p) for p in prompts], "given list"
    if not prompt_list:
        raise DataError("there are no prompts to audit.")
    if given_reference is not None:
        reference = given_reference
    else:
        reference = [str(p) for p in reference_prompts] if reference_prompts else []
    if not reference and held is not None:
        reference = list(held.captions)
    if held is not None and len(held) < 2:
        raise DataError(f"the held-out set {heldout_source} has {len(held)} image(s); quality needs at least 2.")
    heldout_in_train = len(dataset.overlap(held)) if held is not None else 0  # by content, not by name
    if held is not None and heldout_in_train == len(held):
        raise DataError(f"every image of --heldout {heldout_source} is also in --train {train_source}; held-out images "
                        "must be ones the model was not trained on.")
    if heldout_in_train:
        logger.warning("%d of the %d held-out images are also training images; the report counts them",
                       heldout_in_train, len(held))
    if config.mitigation == "threshold" and config.mitigation_target == "auto" and not reference:
        raise ConfigError("--mitigation threshold with an auto target needs reference prompts (--reference-prompts or "
                          "--heldout), or give a number with --mitigation-target.")
    if config.mitigation == "threshold" and target.family.black_box:
        raise ConfigError(f"--mitigation threshold optimizes the prompt embedding against the denoiser, which memaudit "
                          f"cannot read in a {type(target.pipe).__name__} ({target.family.title}); use --mitigation "
                          "rwa or none.")
    if config.calibrate_edge and not reference:
        raise ConfigError("calibrating the edge threshold needs reference prompts known not to be memorized.")
    extractor = get_extractor(config.features, device=here, **config.feature_options)
    q_extractor = None
    if held is not None:
        if config.quality_features is None:
            q_extractor = extractor
        else:
            q_extractor = get_extractor(config.quality_features, device=here, **config.quality_feature_options)
    scorer = get_scorer(config.alignment, device=here) if config.alignment else None
    ext_cfg = ExtractionConfig(tiles=config.tiles, edge_threshold=config.edge_threshold, min_clique=config.min_clique,
                               delta=config.delta)
    own_of = {}
    for i, cap in enumerate(dataset.captions):
        own_of.setdefault(cap, i)
    model_id = _model_id(getattr(target, "path", "") or model) if not isinstance(model, Target) else \
        (str(target.path) or "in-memory model")
    pool = None
    if distributed:
        from memaudit.distributed import RayWorkers

        pool = RayWorkers(config.workers, address=config.ray_address, device=config.device,
                          threads=torch.get_num_threads(), what="the audit", name="audit")  # unreachable, too small: one line, nothing written
    try:
        device_type = pool.device_type if pool is not None else torch.device(target.device).type
        identity = _identity(model_id, model_sha256 or model_digest(target.path), target, dataset, held,
                             convert_channels, prompt_list, reference, config, device_type)
        journal = AuditJournal(journal_dir(out), identity, {"prompts": len(prompt_list),
                                                             "reference_prompts": len(reference)})
        if journal.exists:
            logger.info("resuming the audit journaled in %s", journal.folder)
        if pool is not None:
            model_arg = model if not Path(str(model)).exists() else str(Path(model).resolve())
            pool.start(AuditWorker.load, WorkerSpec(model=model_arg, loras=[[a["path"], a["scale"]] for a in target.loras],
                                  config=config.to_dict(), device=device_type,
                                  threads=pool.threads if device_type == "cpu" else None, quality=held is not None))

        # -- training features and image descriptors: one streamed pass over the set, both cached by content ----
        index, lookup, reused = _training_indexes(dataset, extractor, config, cache_dir, here, progress)
        if pool is not None:
            executor = _OnRay(pool.ready(progress))
        else:
            executor = _InProcess(AuditWorker(target, config, extractor, q_extractor, scorer))
        journal.begin()
        units = _Units(journal, index, lookup, config, own_of, progress)

        # -- inference-time mitigation: the threshold's target, from the reference prompts' first steps ------------
        norm_target, mitigation_info = None, None
        if config.mitigation == "rwa":
            mitigation_info = {"kind": "rwa", "rwa_words": config.rwa_words,
                               "seeding": "each image's words drawn from SeedSequence([image_seed, RWA])"}
        elif config.mitigation == "threshold":
            found = journal.values.get("mitigation_target")
            if found is None:
                if config.mitigation_target == "auto":
                    progress("mitigation target", 0, 1)
                    norms = torch.from_numpy(np.asarray(executor.first_step_norms(reference)))
                    found = {"value": float(norms.median()), "source": f"median first-step guidance norm of the "
                             f"{len(norms)} reference images, without mitigation"}
                    progress("mitigation target", 1, 1)
                else:
                    found = {"value": float(config.mitigation_target), "source": "given"}
                journal.add_value("mitigation_target", found)
            norm_target = float(found["value"])
            mitigation_info = {"kind": "threshold", "norm_target": norm_target, "norm_target_source": found["source"],
                               "lr": config.mitigation_lr, "max_steps": config.mitigation_steps}

        # -- reference prompts: calibrate the edge threshold and the denoising threshold ----------------------
        ref_records = units.run(executor, "reference", reference, "reference prompts", ext_cfg.edge_threshold,
                                norm_target) if reference else []
        if config.calibrate_edge:
            ref_gens = [torch.from_numpy(g) for r in ref_records for g in r["arrays"]["small"]]
            ext_cfg.edge_threshold = calibrate_edge_threshold(ref_gens, tiles=config.tiles,
                                                              quantile=config.edge_quantile)
            logger.info("edge threshold calibrated to %.4f", ext_cfg.edge_threshold)

        # -- the audited prompts --------------------------------------------------------------------------------
        records = units.run(executor, "audit", prompt_list, "sampling", ext_cfg.edge_threshold, norm_target)
        verdicts = {}
        for r in records:
            for i, v in zip(range(r["start"], r["stop"]), r["verdicts"]):
                verdicts[i] = _verdict(v)
        logger.info("the medoid checks read %d of the %d training images", lookup.images_read, len(dataset))

        # -- the nearest training images of flagged prompts, and what the model's VAE makes of them -------------
        shown_train = sorted({v.nearest_train_index for v in verdicts.values()
                              if v.flagged and v.nearest_train_index is not None}) if not config.redact else []
        train_images, round_trips = {}, {}
        for t in shown_train:
            train_images[t] = dataset.read([t])  # that image only, [-1, 1]
            if not target.family.black_box:  # no VAE memaudit can drive
                round_trips[t] = np.array(executor.round_trip(train_images[t].numpy()))  # writable
        machine = executor.machine
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    if pool is not None:
        pool.close()

    # -- the results, from the journaled units ------------------------------------------------------------------
    def stacked(recs: list[dict], name: str) -> np.ndarray:
        return np.concatenate([r["arrays"][name] for r in recs])

    sampling_time = sum(r["unet_time_s"] for r in records)
    extra_calls = sum(r["extra_calls"] for r in records + ref_records)
    amd_res = AMDResult(amd=0.0, per_image=stacked(records, "distances"), nearest=stacked(records, "nearest"))
    amd_res.amd = float(amd_res.per_image.mean())
    all_norms, p_all, g_all = stacked(records, "norms"), stacked(records, "prompt_index"), stacked(records, "generation")
    seeds_all = stacked(records, "seeds")
    aligned = stacked(records, "alignment") if config.alignment else None
    used = [p for r in records for p in (r["prompts_used"] or [])]
    window = score_window(config, target)
    per_image = image_scores(all_norms, window)  # each image's mean over the scored steps (Flux: the first)
    image_rows = []
    for k in range(len(p_all)):
        row = {"prompt_index": int(p_all[k]), "generation": int(g_all[k]), "seed": int(seeds_all[k]),
               "min_cosine_distance": float(amd_res.per_image[k]), "nearest_train_index": int(amd_res.nearest[k]),
               "denoising_norm": float(per_image[k])}
        if used:
            row["prompt_used"] = used[k]
        if aligned is not None:
            row["alignment"] = None if np.isnan(aligned[k]) else float(aligned[k])
        image_rows.append(row)
    grids = {}
    for r in records:
        for i, g in zip(range(r["start"], r["stop"]), r["grids"]):
            if g is not None:
                grids[i] = None if g.get("withheld") else (f"grids/prompt-{i:05d}.png", g["columns"])
    if mitigation_info is not None and config.mitigation == "threshold":
        mitigation_info.update(_optimization_summary(SimpleNamespace(
            before=[torch.from_numpy(r["arrays"]["mitigation_before"]) for r in records],
            after=[torch.from_numpy(r["arrays"]["mitigation_after"]) for r in records],
            steps=[s for r in records for s in r["mitigation_steps"]], norm_target=norm_target)))

    # -- denoising strength, thresholds, detection ---------------------------------------------------------
    from memaudit.metrics.detection import calibrate_threshold, summarize

    scores = prompt_scores(torch.from_numpy(all_norms), torch.from_numpy(p_all), len(prompt_list), window=window,
                           generation=torch.from_numpy(g_all), max_generations=config.denoising_generations)
    threshold = flagged_by_threshold = None
    scored = not target.family.black_box  # a black box has no denoiser memaudit can read: no scores
    if reference and scored:
        ref_scores = prompt_scores(torch.from_numpy(stacked(ref_records, "norms")),
                                   torch.from_numpy(stacked(ref_records, "prompt_index")), len(reference),
                                   window=window, generation=torch.from_numpy(stacked(ref_records, "generation")),
                                   max_generations=config.denoising_generations)
        threshold = float(calibrate_threshold(ref_scores, fpr=config.fpr))
        flagged_by_threshold = int((scores > threshold).sum())
    labels = np.array([int(verdicts[i].extracted) for i in range(len(prompt_list))])
    det_scores, label_source = scores, "extraction attack verdicts (extracted = memorized)"
    if reference and scored:
        det_scores = np.concatenate([scores, ref_scores])
        labels = np.concatenate([labels, np.zeros(len(reference), dtype=int)])
        label_source += "; reference prompts as non-memorized"
    detection = None
    if scored and 0 < labels.sum() < len(labels):
        s = summarize(det_scores, labels)
        detection = {"auc": s.auc, "tpr_at_1pct": s.tpr_at_1pct, "tpr_at_01pct": s.tpr_at_01pct, "n_pos": s.n_pos,
                     "n_neg": s.n_neg, "fpr": list(map(float, s.fpr)), "tpr": list(map(float, s.tpr)),
                     "label_source": label_source}

    # -- quality and alignment -------------------------------------------------------------------------------
    quality = None
    if held is not None:
        progress("quality", 0, len(held))
        real = torch.cat([q_extractor((images + 1) / 2) for _, images in
                          held.batches(_feature_batch(q_extractor), pin_memory=_is_cuda(here),
                                       progress=lambda d, t: progress("quality", d, t))])
        quality = _quality(real, torch.from_numpy(stacked(ref_records, "q_features")), q_extractor.name, config,
                           heldout_source)
        quality["heldout_in_train"] = heldout_in_train
    alignment = None
    if config.alignment:
        judged = [r["alignment"] for r in image_rows if r.get("alignment") is not None]
        alignment = {"scorer": scorer.name,
                     "mean": float(np.mean(judged)) if judged else None, "n_images": len(judged)}
        if ref_records:
            ref_judged = stacked(ref_records, "alignment")
            ref_judged = ref_judged[~np.isnan(ref_judged)]
            alignment["reference_mean"] = float(ref_judged.mean()) if len(ref_judged) else None

    per_prompt_amd = np.full(len(prompt_list), np.nan)
    for i in range(len(prompt_list)):
        per_prompt_amd[i] = float(np.mean(amd_res.per_image[p_all == i]))
    vers = versions()
    if pool is not None:
        vers["ray"] = pool.ray_version

    with output_directory(out, "audit") as tmp:
        tile_px = target.resolution  # generations and training images are enlarged alike in the PNGs
        for i, g in grids.items():
            if g is not None:
                atomic_write_bytes(tmp / g[0], (journal.folder / AuditJournal.grid_file(i)).read_bytes())

        # -- nearest training images of flagged prompts ------------------------------------------------------
        prompt_rows = []
        extracted_images = set()
        for i, prompt in enumerate(prompt_list):
            v = verdicts[i]
            train_rel = roundtrip_rel = None
            if v.flagged and v.nearest_train_index is not None and not config.redact:
                # at the model's resolution and the grid's scale, beside what the model's VAE makes of it (the
                # closest the model can draw it): like is compared with like
                train_rel = f"train/train-{v.nearest_train_index:05d}.png"
                roundtrip_rel = f"train/train-{v.nearest_train_index:05d}-vae.png"
                if not (tmp / train_rel).exists():
                    image = train_images[v.nearest_train_index]
                    atomic_write_bytes(tmp / train_rel, png_bytes((image[0] + 1) / 2, tile=tile_px))
                    if v.nearest_train_index in round_trips:
                        drawn = (torch.from_numpy(round_trips[v.nearest_train_index])[0] + 1) / 2
                        atomic_write_bytes(tmp / roundtrip_rel, png_bytes(drawn, tile=tile_px))
                if v.nearest_train_index not in round_trips:
                    roundtrip_rel = None
            if v.extracted and v.nearest_train_index is not None:
                extracted_images.add(v.nearest_train_index)
            prompt_rows.append({
                "index": i, "prompt": prompt, "own_train_index": own_of.get(prompt), "clique_size": v.clique_size,
                "clique_exact": v.clique_exact,
                "flagged": v.flagged, "medoid_generation": v.medoid, "nearest_train_index": v.nearest_train_index,
                "nearest_train_name": dataset.names[v.nearest_train_index] if v.nearest_train_index is not None else None,
                "nearest_train_distance": v.nearest_train_distance, "extracted": v.extracted,
                "denoising_score": float(scores[i]), "amd_mean": float(per_prompt_amd[i]),
                "grid": grids[i][0] if grids.get(i) else None, "grid_columns": grids[i][1] if grids.get(i) else None,
                "grid_withheld": i in grids and grids[i] is None, "train_image": train_rel,
                "train_roundtrip": roundtrip_rel,
            })
        results = {
            "kind": "memaudit.audit", "schema_version": 1,
            "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "model": str(getattr(target, "path", "") or model), "family": target.family.name,
            "adapters": list(target.loras), "train": train_source, "prompts_source": prompts_source,
            "heldout": heldout_source,
            "machine": machine,
            "settings": {**config.to_dict(), "edge_threshold_used": ext_cfg.edge_threshold,
                         "denoising_window_used": list(window),
                         "denoising_extra_calls": extra_calls,
                         "reference_prompts": len(reference)},
            "seeds": {"seed": config.seed, "image_seed": IMAGE_SEED_FORMULA,
                      "reference_seed": reference_seed(config) if reference else None},
            "versions": vers, "redacted": config.redact,
            "summary": {
                "n_prompts": len(prompt_list), "n_images": len(image_rows), "generations_per_prompt": config.generations,
                "flagged_prompts": sum(v.flagged for v in verdicts.values()),
                "extracted_prompts": sum(v.extracted for v in verdicts.values()),
                "extracted_training_images": len(extracted_images),
                "edge_threshold": ext_cfg.edge_threshold, "min_clique": ext_cfg.min_clique, "delta": ext_cfg.delta,
                "feature_extractor": extractor.name, "amd": float(amd_res.amd), "n_train": len(dataset),
                "reference_amd": float(stacked(ref_records, "distances").mean()) if reference else None,
                "denoising_mean": float(np.nanmean(scores)), "denoising_threshold": threshold,
                "denoising_threshold_fpr": config.fpr if threshold is not None else None,
                "denoising_flagged": flagged_by_threshold, "detection": detection,
                "denoising_note": denoising_note(target, extra_calls, window),
                "quality": quality, "alignment": alignment, "mitigation": mitigation_info,
                "wall_time_s": time.perf_counter() - started, "sampling_time_s": sampling_time,
                "reused": {**reused, "prompts_resumed": units.resumed.get("audit", 0),
                           "reference_prompts_resumed": units.resumed.get("reference", 0),
                           "journal": str(journal.folder)},
            },
            "prompts": prompt_rows,
            "images": image_rows,
            "reference_prompts": [{"prompt": p, "denoising_score": float(v)} for p, v in
                                  zip(reference, ref_scores if reference and scored else [float("nan")] * len(reference))],
        }
        write_results(tmp, results)
        write_report(tmp / "results.json", redact=config.redact)
    journal.remove()  # out/ is complete: the journal (with redact too) goes
    return results


def _verdict(d: dict):
    from memaudit.attacks.extraction import PromptVerdict

    return PromptVerdict(**d)


def _driver_device(config: AuditConfig) -> str:
    """Where the driver of a distributed audit computes features: CUDA when asked for (or ``auto``) and present here,
    else the CPU (the workers hold the models)."""
    return "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _feature_batch(extractor) -> int:
    """Images per streamed batch: the extractor's own batch size, so that it sees the same batches as when it was
    given the whole set at once (the same features, bit for bit)."""
    return int(getattr(extractor, "batch_size", 64))


def _training_indexes(dataset, extractor, config: AuditConfig, cache_dir: Path, device: str, progress: Progress):
    """The faiss index of the training features (AMD) and the :class:`~memaudit.lookup.ThumbnailLookup` of the
    training images at the extraction size (the medoid check), loaded from ``cache_dir`` or built in one streamed
    pass over ``dataset``: a batch of images is in memory at a time, never the set."""
    from memaudit.lookup import ThumbnailLookup, dataset_reader, downsample, thumbnail_grid
    from memaudit.neighbors import NeighborIndex

    n = len(dataset)
    side = min(dataset.resolution, config.extraction_size)  # what downsample() leaves of a training image
    shape = (dataset.channels, side, side)
    read = dataset_reader(dataset, config.extraction_size)
    grid = thumbnail_grid(side, side)
    feature_key = cache_key(dataset, f"features:{extractor.name}:{json.dumps(config.feature_options, sort_keys=True)}")
    thumb_key = cache_key(dataset, f"descriptors:v1:{shape}:{grid}")
    index = NeighborIndex.load(cache_dir, feature_key)
    if index is not None and index.ntotal != n:
        index = None
    lookup = ThumbnailLookup.load(cache_dir, thumb_key, read, shape, n=n)
    reused = {"training_features": "cache" if index is not None else "computed",
              "training_thumbnails": "cache" if lookup is not None else "computed", "training_images": n}
    logger.info("training features: %s, thumbnails: %s (%d images, %s)", reused["training_features"],
                reused["training_thumbnails"], n, cache_dir)
    progress("training features", 0, n)
    if index is None or lookup is None:
        stream = (NeighborIndex(metric="cosine", device=device).stream(n, spill_dir=cache_dir)
                  if index is None else None)
        building = ThumbnailLookup(read, shape) if lookup is None else None
        try:
            for _, images in dataset.batches(_feature_batch(extractor), pin_memory=_is_cuda(device),
                                             progress=lambda d, t: progress("training features", d, t)):
                images01 = (images + 1) / 2
                if stream is not None:
                    stream.add(extractor(images01))
                if building is not None:
                    building.add(downsample(images01, config.extraction_size))
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        if stream is not None:
            index = stream.finish()
            index.save(cache_dir, feature_key)
        if building is not None:
            lookup = building
            lookup.save(cache_dir, thumb_key)
    progress("training features", n, n)
    return index, lookup, reused


def reference_seed(config: AuditConfig) -> int:
    """Reference prompts get their own seed stream, so they never share noise with the audited prompts."""
    return config.seed + 1


def _optimization_summary(hook) -> dict:
    before, after = torch.cat(hook.before), torch.cat(hook.after)
    return {"first_step_norm_before_mean": float(before.mean()), "first_step_norm_after_mean": float(after.mean()),
            "images_over_target_after": int((after >= hook.norm_target).sum()), "images": len(after),
            "optimizer_steps_mean": float(np.mean(hook.steps))}


def _quality(real: torch.Tensor, fake: torch.Tensor, name: str, config: AuditConfig, source) -> dict:
    from memaudit.metrics.quality import fid_from_features, kid_from_features, recommendation

    kid, kid_std = kid_from_features(real, fake, subsets=config.kid_subsets, seed=config.seed)
    fid = fid_from_features(real, fake)
    recommended, note = recommendation(len(real), len(fake))
    return {"kid": kid, "kid_std": kid_std, "fid": fid, "n_real": len(real), "n_fake": len(fake),
            "feature_extractor": name, "recommended": recommended, "note": note,
            "compared": f"generations for the held-out captions against the held-out images ({source})"}


def denoising_note(target, extra_calls: int, window: tuple) -> str | None:
    """What the report says about how (or whether) the denoising strength was measured, for models that are not
    plain classifier-free-guided ones."""
    cls = type(target.pipe).__name__
    if target.family.black_box:
        return (f"No denoising strength: {cls} is audited as a black box (images only); memaudit reads the "
                f"conditional and unconditional predictions only of the families it knows, so the extraction attack "
                f"and AMD are the whole audit.")
    if extra_calls:
        start, stop = window
        steps = ("the first step" if (start, stop) == (0, 1) else "every step" if (start, stop) == (0, None)
                 else f"step {start + 1}" if stop == start + 1
                 else f"steps {start + 1} to {'the last' if stop is None else stop}")
        why = ("makes no unconditional prediction (guidance-distilled)" if not target.family.classifier_free_guidance
               else "sampled without classifier-free guidance (guidance <= 1)")
        return (f"{cls} {why}: the denoising strength cost one extra denoiser evaluation per image at {steps} "
                f"({extra_calls} in all, audited and reference images together).")
    return None


def score_window(config: AuditConfig, target) -> tuple[int, int | None]:
    """The steps the denoising score averages over. A model that makes no unconditional prediction (Flux dev)
    pays one extra denoiser call per image at every scored step, so there the default window (all steps) becomes
    the first step only: the score that detects best (RESULTS section 9) at the least cost."""
    window = tuple(config.denoising_window)
    if not target.family.classifier_free_guidance and window == (0, None):
        return (0, 1)
    return window


