"""The results of an audit, assembled from its journaled units: what they add up to (:func:`tally_units`: AMD, the
denoising scores, the calibrated threshold and the detection summary) and the results dict itself
(:func:`assemble_results`). Pure: nothing here reads or writes a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from memaudit.attacks.denoising import image_scores, prompt_scores
from memaudit.attacks.extraction import PromptVerdict
from memaudit.audit.config import AuditConfig, detector_key, reference_seed, score_window
from memaudit.audit.inputs import AuditInputs
from memaudit.detectors import get_detector
from memaudit.metrics.amd import AMDResult
from memaudit.metrics.detection import calibrate_threshold, summarize
from memaudit.sampling import IMAGE_SEED_FORMULA

__all__ = ["Sampled", "Tally", "assemble_results", "denoising_note", "prompt_rows", "stacked", "tally_units",
           "train_files", "verdicts_of"]


@dataclass
class Sampled:
    """What sampling left for the results: the journaled units (audited and reference prompts), the verdicts, the
    threshold mitigation's target and its summary, the nearest training images of flagged prompts and their VAE
    round trips, where it ran, and what came from caches and the journal."""

    records: list[dict]
    ref_records: list[dict]
    verdicts: dict[int, PromptVerdict]
    norm_target: float | None
    mitigation: dict | None
    train_images: dict[int, torch.Tensor]
    round_trips: dict[int, np.ndarray]
    machine: str
    reused: dict
    resumed: dict[str, int]  # kind -> prompts taken from the journal
    journal: Path


@dataclass
class Tally:
    """What the journaled units add up to: AMD and the denoising scores per image and per prompt, the threshold
    calibrated on the reference prompts and the detection summary, the grids of flagged prompts."""

    sampling_time: float
    extra_calls: int
    amd: AMDResult
    prompt_index: np.ndarray  # of each image
    window: tuple
    image_rows: list[dict]
    grids: dict[int, tuple[str, int] | None]  # flagged prompt -> (file, columns), None: withheld
    scores: np.ndarray
    ref_scores: np.ndarray | None
    detectors: dict[str, dict]  # name -> scores per image and prompt, threshold, detection (:func:`_detectors`)
    scored: bool
    threshold: float | None
    flagged_by_threshold: int | None
    detection: dict | None
    detector_calls: int = 0  # denoiser evaluations the detectors made beyond the sampling pass


def stacked(recs: list[dict], name: str) -> np.ndarray:
    return np.concatenate([r["arrays"][name] for r in recs])


def verdicts_of(records: list[dict]) -> dict[int, PromptVerdict]:
    """The extraction verdict of every audited prompt, by prompt index."""
    verdicts = {}
    for r in records:
        for i, v in zip(range(r["start"], r["stop"]), r["verdicts"]):
            verdicts[i] = PromptVerdict(**v)
    return verdicts


def train_files(index: int) -> tuple[str, str]:
    """Where training image ``index`` and what the model's VAE makes of it go in ``out/``."""
    return f"train/train-{index:05d}.png", f"train/train-{index:05d}-vae.png"


def tally_units(sampled: Sampled, inputs: AuditInputs, config: AuditConfig) -> Tally:
    """Add up the journaled units (and complete the threshold mitigation's summary)."""
    records, ref_records = sampled.records, sampled.ref_records
    sampling_time = sum(r["unet_time_s"] for r in records)
    extra_calls = sum(r["extra_calls"] for r in records + ref_records)
    amd_res = AMDResult(amd=0.0, per_image=stacked(records, "distances"), nearest=stacked(records, "nearest"))
    amd_res.amd = float(amd_res.per_image.mean())
    all_norms, p_all, g_all = stacked(records, "norms"), stacked(records, "prompt_index"), stacked(records, "generation")
    window = score_window(config, inputs.target)
    per_image = image_scores(all_norms, window)  # each image's mean over the scored steps (Flux: the first)
    image_rows = _image_rows(records, amd_res, per_image, p_all, g_all, config)
    grids = {}
    for r in records:
        for i, g in zip(range(r["start"], r["stop"]), r["grids"]):
            if g is not None:
                grids[i] = None if g.get("withheld") else (f"grids/prompt-{i:05d}.png", g["columns"])
    if sampled.mitigation is not None and config.mitigation == "threshold":
        sampled.mitigation.update(_optimization_summary(SimpleNamespace(
            before=[torch.from_numpy(r["arrays"]["mitigation_before"]) for r in records],
            after=[torch.from_numpy(r["arrays"]["mitigation_after"]) for r in records],
            steps=[s for r in records for s in r["mitigation_steps"]], norm_target=sampled.norm_target)))
    scores = prompt_scores(torch.from_numpy(all_norms), torch.from_numpy(p_all), len(inputs.prompts), window=window,
                           generation=torch.from_numpy(g_all), max_generations=config.denoising_generations)
    scored = not inputs.target.family.black_box  # a black box has no denoiser memaudit can read: no scores
    ref_scores, threshold, flagged_by_threshold, detection = _detection(scores, scored, sampled, inputs, config,
                                                                        window)
    detectors = _detectors(sampled, inputs, config, scored)
    for k, row in enumerate(image_rows):
        row["detectors"] = {name: _number(d["images"][k]) for name, d in detectors.items()}
    return Tally(sampling_time, extra_calls, amd_res, p_all, window, image_rows, grids, scores, ref_scores, detectors,
                 scored, threshold, flagged_by_threshold, detection,
                 detector_calls=sum(r["detector_calls"] for r in records + ref_records))


def _image_rows(records: list[dict], amd_res: AMDResult, per_image: np.ndarray, p_all: np.ndarray, g_all: np.ndarray,
                config: AuditConfig) -> list[dict]:
    """One row per audited image: its prompt, generation and seed, AMD distance and denoising norm."""
    seeds_all = stacked(records, "seeds")
    aligned = stacked(records, "alignment") if config.alignment else None
    used = [p for r in records for p in (r["prompts_used"] or [])]
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
    return image_rows


def _detection(scores: np.ndarray, scored: bool, sampled: Sampled, inputs: AuditInputs, config: AuditConfig,
               window: tuple) -> tuple[np.ndarray | None, float | None, int | None, dict | None]:
    """The reference prompts' denoising scores, the threshold calibrated on them, how many audited prompts it
    flags, and how well the score detects the extracted prompts (ROC)."""
    ref_scores = None
    if inputs.reference and scored:
        ref_scores = prompt_scores(torch.from_numpy(stacked(sampled.ref_records, "norms")),
                                   torch.from_numpy(stacked(sampled.ref_records, "prompt_index")), len(inputs.reference),
                                   window=window, generation=torch.from_numpy(stacked(sampled.ref_records, "generation")),
                                   max_generations=config.denoising_generations)
    return (ref_scores, *_judged(scores, ref_scores, scored, sampled, inputs, config))


def _judged(scores: np.ndarray, ref_scores: np.ndarray | None, scored: bool, sampled: Sampled, inputs: AuditInputs,
            config: AuditConfig) -> tuple[float | None, int | None, dict | None]:
    """For one score of the audited prompts: the threshold calibrated on the reference prompts' scores at
    ``--fpr``, how many audited prompts it flags, and how well it detects the extracted prompts (ROC, the reference
    prompts as non-memorized)."""
    reference = inputs.reference
    threshold = flagged_by_threshold = None
    if reference and scored:
        threshold = float(calibrate_threshold(ref_scores, fpr=config.fpr))
        flagged_by_threshold = int((scores > threshold).sum())
    labels = np.array([int(sampled.verdicts[i].extracted) for i in range(len(inputs.prompts))])
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
    return threshold, flagged_by_threshold, detection


def _detectors(sampled: Sampled, inputs: AuditInputs, config: AuditConfig, scored: bool) -> dict[str, dict]:
    """Every chosen detector's scores (per image, per audited and reference prompt: the mean over the first
    ``denoising_generations`` generations) and its threshold and detection, by name."""
    out = {}
    n_prompts, n_ref = len(inputs.prompts), len(inputs.reference)

    def per_prompt(records: list[dict], per_image: np.ndarray, n: int) -> np.ndarray:
        return prompt_scores(torch.from_numpy(per_image[:, None]), torch.from_numpy(stacked(records, "prompt_index")),
                             n, generation=torch.from_numpy(stacked(records, "generation")),
                             max_generations=config.denoising_generations)

    for name in config.detectors:
        cls = get_detector(name)
        images = stacked(sampled.records, detector_key(name)).astype(np.float64)
        prompts = per_prompt(sampled.records, images, n_prompts)
        ref = per_prompt(sampled.ref_records, stacked(sampled.ref_records, detector_key(name)).astype(np.float64),
                         n_ref) if n_ref else None
        reads = cls.families is None or inputs.target.family.name in cls.families
        threshold, flagged, detection = _judged(prompts, ref, scored and reads, sampled, inputs, config)
        out[name] = {"images": images, "prompts": prompts, "reference": ref, "threshold": threshold,
                     "flagged": flagged, "detection": detection, "summary": cls.summary, "source": cls.source,
                     "extra_calls_per_image": cls.extra_calls,
                     "reads_family": reads}
    return out


def _alignment(tally: Tally, sampled: Sampled, inputs: AuditInputs, config: AuditConfig) -> dict | None:
    """The alignment scorer's mean over the audited images it could judge (and over the reference images)."""
    if not config.alignment:
        return None
    judged = [r["alignment"] for r in tally.image_rows if r.get("alignment") is not None]
    alignment = {"scorer": inputs.scorer.name,
                 "mean": float(np.mean(judged)) if judged else None, "n_images": len(judged)}
    if sampled.ref_records:
        ref_judged = stacked(sampled.ref_records, "alignment")
        ref_judged = ref_judged[~np.isnan(ref_judged)]
        alignment["reference_mean"] = float(ref_judged.mean()) if len(ref_judged) else None
    return alignment


def prompt_rows(tally: Tally, sampled: Sampled, inputs: AuditInputs, config: AuditConfig) -> tuple[list[dict], int]:
    """One row per audited prompt (its verdict, scores, grid and nearest training image), and how many training
    images were extracted."""
    grids, verdicts, dataset = tally.grids, sampled.verdicts, inputs.dataset
    per_prompt_amd = np.full(len(inputs.prompts), np.nan)
    for i in range(len(inputs.prompts)):
        per_prompt_amd[i] = float(np.mean(tally.amd.per_image[tally.prompt_index == i]))
    rows, extracted_images = [], set()
    for i, prompt in enumerate(inputs.prompts):
        v = verdicts[i]
        train_rel = roundtrip_rel = None
        if v.flagged and v.nearest_train_index is not None and not config.redact:
            train_rel, roundtrip_rel = train_files(v.nearest_train_index)
            if v.nearest_train_index not in sampled.round_trips:
                roundtrip_rel = None
        if v.extracted and v.nearest_train_index is not None:
            extracted_images.add(v.nearest_train_index)
        rows.append({
            "index": i, "prompt": prompt, "own_train_index": inputs.own_of.get(prompt), "clique_size": v.clique_size,
            "clique_exact": v.clique_exact,
            "flagged": v.flagged, "medoid_generation": v.medoid, "nearest_train_index": v.nearest_train_index,
            "nearest_train_name": dataset.names[v.nearest_train_index] if v.nearest_train_index is not None else None,
            "nearest_train_distance": v.nearest_train_distance, "extracted": v.extracted,
            "denoising_score": float(tally.scores[i]), "amd_mean": float(per_prompt_amd[i]),
            "grid": grids[i][0] if grids.get(i) else None, "grid_columns": grids[i][1] if grids.get(i) else None,
            "grid_withheld": i in grids and grids[i] is None, "train_image": train_rel,
            "train_roundtrip": roundtrip_rel,
            "detectors": {name: _number(d["prompts"][i]) for name, d in tally.detectors.items()},
        })
    return rows, len(extracted_images)


def assemble_results(model, inputs: AuditInputs, config: AuditConfig, sampled: Sampled, tally: Tally,
                     quality: dict | None, versions: dict, created_utc: str, wall_time_s: float) -> dict:
    """The results dict (``results.json``, schema in :mod:`memaudit.report`) of what the audit found."""
    target, dataset, reference, ext_cfg = inputs.target, inputs.dataset, inputs.reference, inputs.ext_cfg
    verdicts, scores, threshold, window = sampled.verdicts, tally.scores, tally.threshold, tally.window
    rows, extracted_training_images = prompt_rows(tally, sampled, inputs, config)
    alignment = _alignment(tally, sampled, inputs, config)
    return {
        "kind": "memaudit.audit", "schema_version": 1,
        "created_utc": created_utc,
        "model": str(getattr(target, "path", "") or model), "family": target.family.name,
        "adapters": list(target.loras), "train": inputs.train_source, "prompts_source": inputs.prompts_source,
        "heldout": inputs.heldout_source,
        "machine": sampled.machine,
        "settings": {**config.to_dict(), "edge_threshold_used": ext_cfg.edge_threshold,
                     "denoising_window_used": list(window),
                     "denoising_extra_calls": tally.extra_calls,
                     "reference_prompts": len(reference)},
        "seeds": {"seed": config.seed, "image_seed": IMAGE_SEED_FORMULA,
                  "reference_seed": reference_seed(config) if reference else None},
        "versions": versions, "redacted": config.redact,
        "summary": {
            "n_prompts": len(inputs.prompts), "n_images": len(tally.image_rows),
            "generations_per_prompt": config.generations,
            "flagged_prompts": sum(v.flagged for v in verdicts.values()),
            "extracted_prompts": sum(v.extracted for v in verdicts.values()),
            "extracted_training_images": extracted_training_images,
            "edge_threshold": ext_cfg.edge_threshold, "min_clique": ext_cfg.min_clique, "delta": ext_cfg.delta,
            "feature_extractor": inputs.extractor.name, "amd": float(tally.amd.amd), "n_train": len(dataset),
            "reference_amd": float(stacked(sampled.ref_records, "distances").mean()) if reference else None,
            "denoising_mean": float(np.nanmean(scores)), "denoising_threshold": threshold,
            "denoising_threshold_fpr": config.fpr if threshold is not None else None,
            "denoising_flagged": tally.flagged_by_threshold, "detection": tally.detection,
            "detectors": {name: {k: d[k] for k in ("summary", "source", "extra_calls_per_image", "reads_family",
                                                   "threshold", "flagged", "detection")}
                          | {"threshold_fpr": config.fpr if d["threshold"] is not None else None,
                             "mean": _number(np.nanmean(d["prompts"])) if np.isfinite(d["prompts"]).any() else None}
                          for name, d in tally.detectors.items()},
            "detector_calls": tally.detector_calls,
            "denoising_note": denoising_note(target, tally.extra_calls, window),
            "quality": quality, "alignment": alignment, "mitigation": sampled.mitigation,
            "wall_time_s": wall_time_s, "sampling_time_s": tally.sampling_time,
            "reused": {**sampled.reused, "prompts_resumed": sampled.resumed.get("audit", 0),
                       "reference_prompts_resumed": sampled.resumed.get("reference", 0),
                       "journal": str(sampled.journal)},
        },
        "prompts": rows,
        "images": tally.image_rows,
        "reference_prompts": [{"prompt": p, "denoising_score": float(v),
                               "detectors": {name: _number(d["reference"][k]) for name, d in tally.detectors.items()}}
                              for k, (p, v) in enumerate(zip(reference, tally.ref_scores if reference and tally.scored
                                                             else [float("nan")] * len(reference)))],
    }


def _number(value) -> float | None:
    """A score as results.json holds it: a float, None when there is none (NaN)."""
    value = float(value)
    return None if np.isnan(value) else value


def _optimization_summary(hook) -> dict:
    before, after = torch.cat(hook.before), torch.cat(hook.after)
    return {"first_step_norm_before_mean": float(before.mean()), "first_step_norm_after_mean": float(after.mean()),
            "images_over_target_after": int((after >= hook.norm_target).sum()), "images": len(after),
            "optimizer_steps_mean": float(np.mean(hook.steps))}


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
