"""What an audit reads, checked before anything is written: first what needs no model (:func:`check_before_loading`:
outputs, caches, prompt files, a journal to resume), then the model and the data (:func:`load_inputs`); and the
identity a journal must match to be resumed (:func:`audit_identity`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memaudit.attacks.extraction import ExtractionConfig
from memaudit.audit.config import AuditConfig, Progress, identity_settings
from memaudit.audit.journal import AuditJournal, journal_dir
from memaudit.audit.prompts import read_prompts
from memaudit.core.digests import tree_digest
from memaudit.core.errors import ConfigError, DataError
from memaudit.core.io import check_writable, default_cache_dir
from memaudit.core.outputs import check_cache, check_clear, check_output, check_partial, dataset_inputs
from memaudit.data import ImageCaptionDataset, dataset_for_target
from memaudit.features import get_extractor
from memaudit.metrics.alignment import get_scorer
from memaudit.target import Target, load_target

__all__ = ["AuditInputs", "Checked", "audit_identity", "audit_inputs", "check_before_loading", "load_inputs",
           "model_digest"]

logger = logging.getLogger("memaudit.audit")  # the audit's one logger, as before it was a package


def audit_inputs(model, train, heldout, prompts, reference_prompts, loras, cache_root) -> list[tuple[str, object]]:
    """What an audit reads, named as the user gave it, for :func:`memaudit.core.outputs.check_output`."""
    named = [("the model", model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)),
             ("--train", train if isinstance(train, (str, os.PathLike)) else None),
             ("--heldout", heldout if isinstance(heldout, (str, os.PathLike)) else None),
             ("--prompts", prompts if isinstance(prompts, (str, os.PathLike)) else None),
             ("--reference-prompts", reference_prompts if isinstance(reference_prompts, (str, os.PathLike)) else None),
             ("--cache-dir", cache_root)]
    return named + [("--lora", lora[0]) for lora in loras]


@dataclass
class Checked:
    """What is known before the model loads: the output folder (checked), the folder of the training-feature cache,
    the prompts of prompt files (None: not given as a file) and the digest of a model folder."""

    out: Path
    cache_dir: Path
    given_prompts: list[str] | None
    given_reference: list[str] | None
    model_sha256: str | None


def check_before_loading(model, train, out, prompts, reference_prompts, heldout, config: AuditConfig) -> Checked:
    """The checks that need no model, before it loads: the cache folder is writable, the prompt files are read,
    nothing the user gave is written over, and a journal in ``OUT.partial/`` is one this audit may resume."""
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
    return Checked(out, cache_dir, given_prompts, given_reference, model_sha256)


@dataclass
class AuditInputs:
    """The model, the data and the prompts of an audit, checked, and what this process computes features with."""

    target: Target
    here: str  # where this process computes features (of the training set, the held-out images)
    dataset: ImageCaptionDataset
    train_source: str
    held: ImageCaptionDataset | None
    heldout_source: str | None
    prompts: list[str]
    prompts_source: str
    reference: list[str]
    heldout_in_train: int  # held-out images that are training images too (by content)
    extractor: Any
    q_extractor: Any  # quality features of the held-out set (None without one)
    scorer: Any  # the alignment scorer (None when not asked for)
    ext_cfg: ExtractionConfig  # its edge threshold is calibrated on the reference prompts when asked for
    own_of: dict[str, int]  # a training caption's first image
    model_id: str


def load_inputs(model, train, heldout, prompts, reference_prompts, checked: Checked, config: AuditConfig,
                convert_channels: bool, progress: Progress) -> AuditInputs:
    """Load the model and the data and check every input against them, before anything is written."""
    distributed = config.workers > 1
    progress("loading model", 0, 1)
    # with workers, this copy only answers questions about the model (its family, resolution, ...): on the CPU
    target = model if isinstance(model, Target) else load_target(
        model, device="cpu" if distributed else config.device, dtype=config.dtype, loras=config.loras)
    # where this process computes features (of the training set, the held-out images)
    here = _driver_device(config) if distributed else str(target.device)
    dataset, train_source = dataset_for_target(train, target, convert_channels)
    held, heldout_source = dataset_for_target(heldout, target, convert_channels) if heldout is not None else (None, None)
    images_in = dataset_inputs(dataset, "the training images") + dataset_inputs(held, "the held-out images")
    check_clear(checked.out, images_in)  # a captions file can name images anywhere
    check_clear(journal_dir(checked.out), images_in, "--out's work folder")
    prompt_list, prompts_source = _prompt_list(prompts, checked.given_prompts, dataset)
    reference = _reference_list(reference_prompts, checked.given_reference, held)
    heldout_in_train = _check_heldout(dataset, held, train_source, heldout_source)
    _check_settings(config, target, reference)
    extractor = get_extractor(config.features, device=here, **config.feature_options)
    q_extractor = None
    if held is not None:
        if config.quality_features is None:
            q_extractor = extractor
        else:
            q_extractor = get_extractor(config.quality_features, device=here, **config.quality_feature_options)
    scorer = get_scorer(config.alignment, device=here) if config.alignment else None
    ext_cfg = config.extraction()
    own_of = {}
    for i, cap in enumerate(dataset.captions):
        own_of.setdefault(cap, i)
    model_id = _model_id(getattr(target, "path", "") or model) if not isinstance(model, Target) else \
        (str(target.path) or "in-memory model")
    return AuditInputs(target, here, dataset, train_source, held, heldout_source, prompt_list, prompts_source,
                       reference, heldout_in_train, extractor, q_extractor, scorer, ext_cfg, own_of, model_id)


def _prompt_list(prompts, given: list[str] | None, dataset) -> tuple[list[str], str]:
    """The prompts to audit and where they come from: a prompt file, the training captions, or the given list."""
    if given is not None:
        prompt_list, prompts_source = given, str(prompts)
    elif prompts is None:
        prompt_list, prompts_source = list(dict.fromkeys(dataset.captions)), "training captions"
    else:
        prompt_list, prompts_source = [str(p) for p in prompts], "given list"
    if not prompt_list:
        raise DataError("there are no prompts to audit.")
    return prompt_list, prompts_source


def _reference_list(reference_prompts, given: list[str] | None, held) -> list[str]:
    """The reference prompts: a prompt file, the given list, else the held-out captions (none without them)."""
    if given is not None:
        reference = given
    else:
        reference = [str(p) for p in reference_prompts] if reference_prompts else []
    if not reference and held is not None:
        reference = list(held.captions)
    return reference


def _check_heldout(dataset, held, train_source: str, heldout_source: str | None) -> int:
    """Refuse a held-out set too small for quality, or wholly in the training set; returns how many of its images
    are training images (by content, not by name)."""
    if held is not None and len(held) < 2:
        raise DataError(f"the held-out set {heldout_source} has {len(held)} image(s); quality needs at least 2.")
    heldout_in_train = len(dataset.overlap(held)) if held is not None else 0  # by content, not by name
    if held is not None and heldout_in_train == len(held):
        raise DataError(f"every image of --heldout {heldout_source} is also in --train {train_source}; held-out images "
                        "must be ones the model was not trained on.")
    if heldout_in_train:
        logger.warning("%d of the %d held-out images are also training images; the report counts them",
                       heldout_in_train, len(held))
    return heldout_in_train


def _check_settings(config: AuditConfig, target, reference: list[str]) -> None:
    """Refuse settings that need what the audit lacks: reference prompts, or a denoiser memaudit can read."""
    if config.mitigation == "threshold" and config.mitigation_target == "auto" and not reference:
        raise ConfigError("--mitigation threshold with an auto target needs reference prompts (--reference-prompts or "
                          "--heldout), or give a number with --mitigation-target.")
    if config.mitigation == "threshold" and target.family.black_box:
        raise ConfigError(f"--mitigation threshold optimizes the prompt embedding against the denoiser, which memaudit "
                          f"cannot read in a {type(target.pipe).__name__} ({target.family.title}); use --mitigation "
                          "rwa or none.")
    if config.calibrate_edge and not reference:
        raise ConfigError("calibrating the edge threshold needs reference prompts known not to be memorized.")


def _driver_device(config: AuditConfig) -> str:
    """Where the driver of a distributed audit computes features: CUDA when asked for (or ``auto``) and present here,
    else the CPU (the workers hold the models)."""
    return "cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu"


def _digest(items: list[str]) -> dict:
    return {"count": len(items), "sha256": hashlib.sha256(json.dumps(items).encode("utf-8")).hexdigest()}


def _model_id(model) -> str:
    return str(Path(model).resolve()) if Path(str(model)).exists() else str(model)


def model_digest(model) -> str | None:
    """The content of a model folder (SHA-256 over its files, :func:`memaudit.core.digests.tree_digest`): a model
    re-fine-tuned in place is another model. None for a hub id or an in-memory model."""
    if not isinstance(model, (str, os.PathLike)) or not str(model) or not Path(model).is_dir():
        return None
    return tree_digest(model)


def audit_identity(model_id: str, model_sha256: str | None, target, dataset, held, convert_channels: bool,
                   prompts: list[str], reference: list[str], config: AuditConfig, device_type: str) -> dict:
    """What must match for an audit to resume another's journal."""
    return {"model": model_id, "model_sha256": model_sha256, "family": target.family.name,
            "adapters": [{"path": a["path"], "sha256": a["sha256"], "scale": a["scale"]} for a in target.loras],
            "train": dataset.content_key(captions=True), "convert_channels": bool(convert_channels),
            "heldout": held.content_key(captions=True) if held is not None else None,
            "prompts": _digest(prompts), "reference_prompts": _digest(reference), "device": device_type,
            "settings": identity_settings(config)}
