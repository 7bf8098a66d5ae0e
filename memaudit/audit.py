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
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from memaudit.attacks.extraction import ExtractionConfig
from memaudit.errors import ConfigError, DataError
from memaudit.io import check_writable, default_cache_dir

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

    def __post_init__(self):
        self.denoising_window = tuple(self.denoising_window)
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


def run_audit(model, train, out: str | Path, prompts: Sequence[str] | str | Path | None = None,
              reference_prompts: Sequence[str] | str | Path | None = None, config: AuditConfig | None = None,
              progress: Progress | None = None, convert_channels: bool = False, heldout=None) -> dict:
    """Audit ``model`` (a folder, hub id in the cache, or a :class:`~memaudit.target.Target`) against ``train``
    (a folder/captions file or an :class:`~memaudit.data.ImageCaptionDataset`). Returns the results dict that is
    also written to ``out/results.json``.

    ``heldout`` (optional, same forms as ``train``): images and captions of the same domain that were *not* trained
    on. Its captions are the reference prompts (unless ``reference_prompts`` is given), and the generations for them
    are compared with its images for quality (KID and FID in ``config.quality_features``)."""
    from memaudit.attacks.extraction import analyze_prompt, calibrate_edge_threshold
    from memaudit.data import dataset_for_target
    from memaudit.features import get_extractor
    from memaudit.images import grid_columns, image_grid, png_bytes
    from memaudit.io import atomic_directory, atomic_write_bytes
    from memaudit.lookup import downsample
    from memaudit.metrics.alignment import get_scorer
    from memaudit.metrics.amd import AMDAccumulator
    from memaudit.report import write_report, write_results
    from memaudit.sampling import IMAGE_SEED_FORMULA, Sampler
    from memaudit.target import Target, load_target

    config = config or AuditConfig()
    progress = progress or (lambda *_: None)
    started = time.perf_counter()
    out = check_writable(out, "--out")
    # the training-feature index is kept outside the output folder, which users share
    cache_dir = check_writable(Path(config.cache_dir) / "features" if config.cache_dir else
                               default_cache_dir() / "features", "--cache-dir")

    # -- check every input before writing anything ---------------------------------------------------------------
    progress("loading model", 0, 1)
    # prompt files need no model: a mistake in them stops before it loads
    given_prompts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else None
    given_reference = read_prompts(reference_prompts) if isinstance(reference_prompts, (str, Path)) else None
    target = model if isinstance(model, Target) else load_target(model, device=config.device, dtype=config.dtype,
                                                                 loras=config.loras)
    dataset, train_source = dataset_for_target(train, target, convert_channels)
    held, heldout_source = dataset_for_target(heldout, target, convert_channels) if heldout is not None else (None, None)
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
    if config.mitigation == "threshold" and config.mitigation_target == "auto" and not reference:
        raise ConfigError("--mitigation threshold with an auto target needs reference prompts (--reference-prompts or "
                          "--heldout), or give a number with --mitigation-target.")
    if config.mitigation == "threshold" and target.family.black_box:
        raise ConfigError(f"--mitigation threshold optimizes the prompt embedding against the denoiser, which memaudit "
                          f"cannot read in a {type(target.pipe).__name__} ({target.family.title}); use --mitigation "
                          "rwa or none.")
    if config.calibrate_edge and not reference:
        raise ConfigError("calibrating the edge threshold needs reference prompts known not to be memorized.")
    extractor = get_extractor(config.features, device=str(target.device), **config.feature_options)
    q_extractor = None
    if held is not None:
        if config.quality_features is None:
            q_extractor = extractor
        else:
            q_extractor = get_extractor(config.quality_features, device=str(target.device),
                                        **config.quality_feature_options)
    scorer = get_scorer(config.alignment, device=str(target.device)) if config.alignment else None
    ext_cfg = ExtractionConfig(tiles=config.tiles, edge_threshold=config.edge_threshold, min_clique=config.min_clique,
                               delta=config.delta)
    own_of = {}
    for i, cap in enumerate(dataset.captions):
        own_of.setdefault(cap, i)

    with atomic_directory(out) as tmp:
        tile_px = target.resolution  # generations and training images are enlarged alike in the PNGs

        # -- training features and image descriptors: one streamed pass over the set, both cached by content -----
        index, lookup = _training_indexes(dataset, extractor, config, cache_dir, str(target.device), progress)

        sampler = Sampler(target, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size,
                          seed=config.seed, score_window=score_window(config, target))
        mitigation, mitigation_info = _mitigation(config, target, sampler, reference, progress)

        # -- reference prompts: calibrate the edge threshold and the denoising threshold ----------------------
        ref_norms, ref_idx, ref_gen, ref_quality, ref_align = [], [], [], [], []
        if reference:
            ref_buffer, ref_gens = _PromptBuffer(config.generations), []
            sampler.progress = lambda d, t: progress("reference prompts", d, t)
            sampler.seed = reference_seed(config)
            ref_amd = AMDAccumulator(index)
            for batch in sampler.run(reference, config.generations):
                ref_amd.update(extractor(batch.images))
                if q_extractor is not None:
                    ref_quality.append(q_extractor(batch.images))
                if scorer is not None:
                    ref_align.append(scorer(batch.images, [reference[i] for i in batch.prompt_index.tolist()]))
                ref_norms.append(batch.guidance_norms)
                ref_idx.append(batch.prompt_index)
                ref_gen.append(batch.generation)
                small = downsample(batch.images, config.extraction_size)
                for k in range(len(small)):
                    done = ref_buffer.add(int(batch.prompt_index[k]), int(batch.generation[k]), small[k])
                    if done is not None:
                        ref_gens.append(done)
            sampler.seed = config.seed
            if config.calibrate_edge:
                ext_cfg.edge_threshold = calibrate_edge_threshold(ref_gens, tiles=config.tiles,
                                                                  quantile=config.edge_quantile)
                logger.info("edge threshold calibrated to %.4f", ext_cfg.edge_threshold)

        # -- the audited prompts --------------------------------------------------------------------------------
        sampler.progress = lambda d, t: progress("sampling", d, t)
        sampler.unet_time_s = 0.0
        if mitigation is not None and hasattr(mitigation, "before"):  # report the audited prompts' optimization only
            mitigation.before.clear(), mitigation.after.clear(), mitigation.steps.clear()
        amd_acc = AMDAccumulator(index)
        buffer = _PromptBuffer(config.generations)
        norms, p_idx, g_idx, seeds = [], [], [], []
        image_rows, verdicts, grids = [], {}, {}
        full_res = {}
        for batch in sampler.run(prompt_list, config.generations):
            feats = extractor(batch.images)
            dists = amd_acc.update(feats)
            aligned = (scorer(batch.images, [prompt_list[i] for i in batch.prompt_index.tolist()])
                       if scorer is not None else None)
            norms.append(batch.guidance_norms)
            p_idx.append(batch.prompt_index)
            g_idx.append(batch.generation)
            seeds += batch.seeds
            small = downsample(batch.images, config.extraction_size)
            for k in range(len(batch.images)):
                i, j = int(batch.prompt_index[k]), int(batch.generation[k])
                image_rows.append({"prompt_index": i, "generation": j, "seed": batch.seeds[k],
                                   "min_cosine_distance": float(dists[k]),
                                   "nearest_train_index": None,  # filled from the AMD result below
                                   "denoising_norm": float(batch.guidance_norms[k].mean())})
                if batch.prompts is not None:
                    image_rows[-1]["prompt_used"] = batch.prompts[k]
                if aligned is not None:
                    image_rows[-1]["alignment"] = None if np.isnan(aligned[k]) else float(aligned[k])
                if j < config.max_grid:
                    full_res.setdefault(i, {})[j] = batch.images[k]
                done = buffer.add(i, j, small[k])
                if done is None:
                    continue
                verdict = analyze_prompt(done, ext_cfg, lookup, own_of.get(prompt_list[i]))
                verdicts[i] = verdict
                shown = full_res.pop(i)
                if verdict.flagged and config.redact and verdict.extracted:
                    grids[i] = None  # the audit matched these generations to a training image: they are one
                elif verdict.flagged:
                    order = list(verdict.clique) + [g for g in sorted(shown) if g not in set(verdict.clique)]
                    order = [g for g in order if g in shown][: config.max_grid]
                    rel = f"grids/prompt-{i:05d}.png"
                    columns = grid_columns(len(order))
                    grid = image_grid(torch.stack([shown[g] for g in order]), columns=columns)
                    atomic_write_bytes(tmp / rel, png_bytes(grid, tile=tile_px))
                    grids[i] = (rel, columns)
        sampling_time = sampler.unet_time_s
        logger.info("the medoid checks read %d of the %d training images", lookup.images_read, len(dataset))
        amd_res = amd_acc.result()
        for row, nearest in zip(image_rows, amd_res.nearest):
            row["nearest_train_index"] = int(nearest)

        # -- denoising strength, thresholds, detection ---------------------------------------------------------
        from memaudit.attacks.denoising import prompt_scores
        from memaudit.metrics.detection import calibrate_threshold, summarize

        all_norms = torch.cat(norms)
        scores = prompt_scores(all_norms, torch.cat(p_idx), len(prompt_list), window=score_window(config, target),
                               generation=torch.cat(g_idx), max_generations=config.denoising_generations)
        threshold = flagged_by_threshold = None
        scored = not target.family.black_box  # a black box has no denoiser memaudit can read: no scores
        if reference and scored:
            ref_scores = prompt_scores(torch.cat(ref_norms), torch.cat(ref_idx), len(reference),
                                       window=score_window(config, target), generation=torch.cat(ref_gen),
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
                              held.batches(_feature_batch(q_extractor), pin_memory=_is_cuda(target.device),
                                           progress=lambda d, t: progress("quality", d, t))])
            quality = _quality(real, torch.cat(ref_quality), q_extractor.name, config, heldout_source)
        alignment = None
        if scorer is not None:
            judged = [r["alignment"] for r in image_rows if r.get("alignment") is not None]
            alignment = {"scorer": scorer.name, "mean": float(np.mean(judged)) if judged else None,
                         "n_images": len(judged)}
            if ref_align:
                ref_judged = np.concatenate(ref_align)
                ref_judged = ref_judged[~np.isnan(ref_judged)]
                alignment["reference_mean"] = float(ref_judged.mean()) if len(ref_judged) else None
        if mitigation is not None and hasattr(mitigation, "before"):
            mitigation_info.update(_optimization_summary(mitigation))

        # -- nearest training images of flagged prompts ------------------------------------------------------
        prompt_rows = []
        extracted_images = set()
        per_prompt_amd = np.full(len(prompt_list), np.nan)
        pi = torch.cat(p_idx).numpy()
        for i in range(len(prompt_list)):
            per_prompt_amd[i] = float(np.mean(amd_res.per_image[pi == i]))
        for i, prompt in enumerate(prompt_list):
            v = verdicts[i]
            train_rel = roundtrip_rel = None
            if v.flagged and v.nearest_train_index is not None and not config.redact:
                # at the model's resolution and the grid's scale, beside what the model's VAE makes of it (the
                # closest the model can draw it): like is compared with like
                train_rel = f"train/train-{v.nearest_train_index:05d}.png"
                roundtrip_rel = f"train/train-{v.nearest_train_index:05d}-vae.png"
                if not (tmp / train_rel).exists():
                    image = dataset.read([v.nearest_train_index])  # that image only, [-1, 1]
                    atomic_write_bytes(tmp / train_rel, png_bytes((image[0] + 1) / 2, tile=tile_px))
                    if target.family.black_box:  # no VAE memaudit can drive
                        roundtrip_rel = None
                    else:
                        drawn = (target.round_trip(image).float().cpu()[0] + 1) / 2
                        atomic_write_bytes(tmp / roundtrip_rel, png_bytes(drawn, tile=tile_px))
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
            "machine": _machine(target.device),
            "settings": {**config.to_dict(), "edge_threshold_used": ext_cfg.edge_threshold,
                         "denoising_window_used": list(score_window(config, target)),
                         "denoising_extra_calls": sampler.extra_calls,
                         "reference_prompts": len(reference)},
            "seeds": {"seed": config.seed, "image_seed": IMAGE_SEED_FORMULA,
                      "reference_seed": reference_seed(config) if reference else None},
            "versions": versions(), "redacted": config.redact,
            "summary": {
                "n_prompts": len(prompt_list), "n_images": len(image_rows), "generations_per_prompt": config.generations,
                "flagged_prompts": sum(v.flagged for v in verdicts.values()),
                "extracted_prompts": sum(v.extracted for v in verdicts.values()),
                "extracted_training_images": len(extracted_images),
                "edge_threshold": ext_cfg.edge_threshold, "min_clique": ext_cfg.min_clique, "delta": ext_cfg.delta,
                "feature_extractor": extractor.name, "amd": float(amd_res.amd), "n_train": len(dataset),
                "reference_amd": float(ref_amd.result().amd) if reference else None,
                "denoising_mean": float(np.nanmean(scores)), "denoising_threshold": threshold,
                "denoising_threshold_fpr": config.fpr if threshold is not None else None,
                "denoising_flagged": flagged_by_threshold, "detection": detection,
                "denoising_note": denoising_note(target, sampler.extra_calls, score_window(config, target)),
                "quality": quality, "alignment": alignment, "mitigation": mitigation_info,
                "wall_time_s": time.perf_counter() - started, "sampling_time_s": sampling_time,
            },
            "prompts": prompt_rows,
            "images": image_rows,
            "reference_prompts": [{"prompt": p, "denoising_score": float(v)} for p, v in
                                  zip(reference, ref_scores if reference and scored else [float("nan")] * len(reference))],
        }
        write_results(tmp, results)
        write_report(tmp / "results.json", redact=config.redact)
    return results


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
    return index, lookup


def reference_seed(config: AuditConfig) -> int:
    """Reference prompts get their own seed stream, so they never share noise with the audited prompts."""
    return config.seed + 1


def _mitigation(config: AuditConfig, target, sampler, reference: list[str], progress: Progress):
    """Install the inference-time mitigation on ``sampler``; returns the hook (or None) and what to report."""
    if config.mitigation == "rwa":
        from memaudit.baselines.rwa import RWAPrompts

        sampler.prompt_transform = RWAPrompts(target.tokenizer, k=config.rwa_words)
        return sampler.prompt_transform, {"kind": "rwa", "rwa_words": config.rwa_words,
                                          "seeding": "each image's words drawn from SeedSequence([image_seed, RWA])"}
    if config.mitigation == "threshold":
        from memaudit.baselines.threshold import EmbeddingMitigation


        norm_target, source = config.mitigation_target, "given"
        if norm_target == "auto":
            progress("mitigation target", 0, 1)
            sampler.seed = reference_seed(config)  # the reference prompts' own images, as sampled below
            norms = sampler.first_step_norms(reference, config.generations)
            sampler.seed = config.seed
            norm_target = float(norms.median())
            source = f"median first-step guidance norm of the {len(norms)} reference images, without mitigation"
            progress("mitigation target", 1, 1)
        hook = EmbeddingMitigation(target, float(norm_target), lr=config.mitigation_lr, max_steps=config.mitigation_steps)
        sampler.embedding_hook = hook
        return hook, {"kind": "threshold", "norm_target": float(norm_target), "norm_target_source": source,
                      "lr": config.mitigation_lr, "max_steps": config.mitigation_steps}
    return None, None


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
        steps = "the first step" if tuple(window) == (0, 1) else f"steps {window[0]} to {window[1]}"
        why = ("makes no unconditional prediction (guidance-distilled)" if not target.family.classifier_free_guidance
               else "sampled without classifier-free guidance (guidance <= 1)")
        return (f"{cls} {why}: the denoising strength cost one extra denoiser call per image at {steps} "
                f"({extra_calls} calls in all).")
    return None


def score_window(config: AuditConfig, target) -> tuple[int, int | None]:
    """The steps the denoising score averages over. A model that makes no unconditional prediction (Flux dev)
    pays one extra denoiser call per image at every scored step, so there the default window (all steps) becomes
    the first step only: the score that detects best (RESULTS section 9) at the least cost."""
    window = tuple(config.denoising_window)
    if not target.family.classifier_free_guidance and window == (0, None):
        return (0, 1)
    return window


def versions() -> dict:
    import diffusers
    import transformers

    import memaudit

    out = {"memaudit": memaudit.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _machine(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
