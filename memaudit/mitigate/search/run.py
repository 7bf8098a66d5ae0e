"""MemControl's search on a real model, as a recipe (:func:`run_mask_search`): check the folders, load the model and
split the data, check the settings against a search to resume, run the schedule (in this process or on workers), then
write the chosen mask, ``pareto.json`` and ``pareto.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import memaudit.target  # load_target is looked up at call time (tests wrap it to see what the search loads)
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_bytes, atomic_write_json, check_writable
from memaudit.core.outputs import check_cache, check_clear, check_output, dataset_inputs, write_marker
from memaudit.core.provenance import versions
from memaudit.data import dataset_for_target
from memaudit.latents import latent_cache_root
from memaudit.mitigate.search.config import (
    OBJECTIVES,
    SETTINGS_FILE,
    SearchConfig,
    check_resume,
    identity_before_loading,
)
from memaudit.mitigate.search.evaluator import MaskEvaluator, method_units
from memaudit.mitigate.search.nsga2 import Progress, RunJobs, check_population
from memaudit.mitigate.search.references import reference_verdict
from memaudit.mitigate.search.schedule import row_inner_steps, run_schedule
from memaudit.mitigate.search.workers import check_ray, on_workers, open_pool
from memaudit.report import figure_png, new_figure

__all__ = ["pareto_png", "run_mask_search"]


def run_mask_search(base, train, out: str | os.PathLike, config: SearchConfig | None = None, *,
                    convert_channels: bool = False, progress: Progress | None = None,
                    cache_dir: str | os.PathLike | None = None) -> dict:
    """MemControl's bi-level search on ``base`` and ``train``; writes ``out/`` (log, front, plot, chosen mask).

    The proxy images' latents are kept in the latent cache in ``cache_dir`` (default: memaudit's cache folder; see
    :mod:`memaudit.latents`): encoded once (progress stage ``"latent cache"``), then found by every evaluation, by a
    rerun of the search and by a fine-tune on the same images. ``latent_cache`` in the result says what it held.

    Returns the document also written to ``pareto.json``. Besides the front, the pick and the references, it says
    what the search cost and what it found: ``fine_tunes`` (``total`` = ``mask_evaluations`` + one per name in
    ``references``, ``run_now``, ``without_training``: all-zero masks scored on the base model; with the screen
    schedule also ``screening`` and ``promoted``) and ``verdict`` (:func:`reference_verdict`: whether a reference
    such as full fine-tuning beats every mask on the front). A population larger than the search space
    (:func:`check_population`) is refused once the units are known, before anything is written.

    ``config.workers > 1`` runs the evaluations on that many Ray workers (see :mod:`memaudit.mitigate.search`;
    ``base`` must be a folder or hub id every worker can load, and the training images at paths every worker can
    read). Ray missing, a ``ray_address`` that does not answer or a cluster too small for the workers is one line,
    before anything is written. The workers start at the first evaluation not in the logs (a search found complete
    starts none), and ``workers``, ``ray_address`` and the versions (with Ray's) are recorded in the result; the logs
    and ``search.json`` do not depend on them, so a search resumes with any number of workers.
    """
    config = config or SearchConfig()
    distributed = config.workers > 1
    if distributed:
        check_ray(config)  # missing, or an address that does not answer: one line, before anything loads
    out = _checked_out(base, train, out, config, cache_dir)
    # resuming with other settings, base or data is refused before the model loads (the splits once the data is read)
    early = identity_before_loading(base, train, config)
    check_resume(out, early)
    # with workers, this copy only answers questions about the model (its units, resolution, ...): on the CPU
    target = memaudit.target.load_target(base, device="cpu" if distributed else config.device, dtype="float32",
                                         loras=config.loras)
    dataset, source, proxy, val = _splits(train, target, out, config, convert_channels)
    # lists the method's units (built on the denoiser and taken out again); nothing is written yet
    evaluator = None if distributed else MaskEvaluator(target, proxy, val, config, progress, cache_dir=cache_dir)
    units = _units(evaluator, target, base, config)
    settings = _full_identity(base, early, source, dataset, proxy, val, config)
    check_resume(out, settings)
    # unreachable, too small for the workers: one line, nothing written
    pool = open_pool(config) if distributed else None
    try:
        vers = _start(out, settings, pool)
        run: RunJobs = (evaluator.run if pool is None else
                        on_workers(pool, base, target, config, proxy, val, cache_dir, progress))
        doc = run_schedule(run, out, config, len(units), progress)
    finally:
        if pool is not None:
            pool.close()
    cache_report = evaluator.cache_report if evaluator is not None else run.cache_report
    _write_mask(out, base, target, units, config, doc["chosen"])
    front_doc = _front_doc(doc, config, cache_report, vers)
    atomic_write_json(out / "pareto.json", front_doc)
    atomic_write_bytes(out / "pareto.png", pareto_png(doc["rows"], doc["front"], doc["chosen"], doc["references"],
                                                      config))
    return front_doc


def _checked_out(base, train, out: str | os.PathLike, config: SearchConfig,
                 cache_dir: str | os.PathLike | None) -> Path:
    """``out`` and the latent cache's folder, checked against each other and the inputs; ``out`` as a Path."""
    cache_root = check_writable(latent_cache_root(cache_dir), "--cache-dir")
    # the search adds its files to --out as it goes (it resumes from them): a new or empty folder, or its own
    named = [("the base model", base if isinstance(base, (str, os.PathLike)) else None),
             ("--train", train if isinstance(train, (str, os.PathLike)) else None), ("--cache-dir", cache_root.parent),
             *[("--lora", lora[0]) for lora in config.loras]]
    out = check_output(out, "search", named, replaces=False)
    check_cache(cache_root.parent, named)
    return out


def _splits(train, target, out: Path, config: SearchConfig, convert_channels: bool) -> tuple:
    """The training images (and their source) read for ``target``, and their proxy and validation splits."""
    dataset, source = dataset_for_target(train, target, convert_channels)
    check_clear(out, dataset_inputs(dataset, "the training images"))  # a captions file can name images anywhere
    if len(dataset) < 4:
        raise ConfigError(f"the training set {source} has {len(dataset)} images; the search needs at least 4.")
    # copies of one image stay together: in validation or not (a validation image the inner loop trained on would
    # score quality on a training image), and in the proxy with all their copies (so it keeps the set's duplication)
    splits = dataset.split(seed=config.seed, val=config.val_fraction, test=0.0, by_content=True)
    rest, val = splits["train"], splits["val"]
    groups = rest.content_groups()
    n_groups = int(groups.max()) + 1
    n_proxy = max(1, round(config.proxy_fraction * n_groups))
    chosen = torch.randperm(n_groups, generator=torch.Generator().manual_seed(config.seed))[:n_proxy].numpy()
    proxy = rest.subset(np.flatnonzero(np.isin(groups, chosen)))
    return dataset, source, proxy, val


def _units(evaluator: MaskEvaluator | None, target, base, config: SearchConfig) -> list:
    """The units the mask switches; a method with none, or a population larger than the search space: ConfigError."""
    units = evaluator.units if evaluator is not None else method_units(target, config)[0]
    if not units:
        raise ConfigError(f"--method {config.method} has nothing to train on {base} (its "
                          f"{type(target.denoiser).__name__} has no {config.method} parameters), so there is no mask "
                          "to search; choose another --method.")
    check_population(config.population, len(units), config.lr_choices,
                     f"{config.method} at {config.granularity} granularity")
    return units


def _full_identity(base, early: dict, source, dataset, proxy, val, config: SearchConfig) -> dict:
    """``search.json``'s identity once the data is read and split, as it reads back from disk."""
    settings = {"kind": "memaudit.search", "schema_version": 1, "base": str(base),
                "base_sha256": early["base_sha256"], "train": source,
                "train_sha256": dataset.content_key(captions=True), "settings": config.to_dict(),
                "proxy": list(proxy.names), "validation": list(val.names)}
    return json.loads(json.dumps(settings))  # as it reads back from disk (tuples become lists)


def _start(out: Path, settings: dict, pool) -> dict:
    """The versions the search runs with (Ray's too, with workers); ``out``'s marker and ``search.json`` written
    unless a search is there already."""
    vers = versions()
    if pool is not None:
        vers["ray"] = pool.ray_version
    settings_file = out / SETTINGS_FILE
    if not settings_file.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "search", listed=False)
        atomic_write_json(settings_file, {**settings, "versions": vers})
    return vers


def _write_mask(out: Path, base, target, units: list, config: SearchConfig, chosen: dict | None) -> None:
    """``mask.json``: the chosen mask, its learning rate and scores, and what stage two needs to apply it (nothing is
    written when no mask was chosen)."""
    mask_doc = {"kind": "memaudit.mask", "schema_version": 1, "method": config.method,
                "granularity": config.granularity, "units": [u.name for u in units],
                "unit_parameters": [u.count for u in units], "base": str(base), "family": target.family.name,
                "denoiser": type(target.denoiser).__name__, "seed": config.seed,
                "inner_steps": config.inner_steps, "schedule": config.schedule,
                "pick": "knee point" if config.preference is None
                else f"weighted sum {list(config.preference)}"}
    if chosen is not None:
        mask_doc.update({"mask": chosen["mask"], "learning_rate": chosen["learning_rate"],
                         "objectives": chosen["objectives"], "trainable_parameters": chosen["trainable_parameters"],
                         "trainable_percent": chosen["trainable_percent"]})
        atomic_write_json(out / "mask.json", mask_doc)


def _front_doc(doc: dict, config: SearchConfig, cache_report: dict | None, vers: dict) -> dict:
    """``pareto.json``: the front, the pick, the references and the verdict, what the search cost and ran with."""
    rows, front, chosen, references = doc["rows"], doc["front"], doc["chosen"], doc["references"]
    screen, result, evaluated = config.schedule == "screen", doc["result"], doc["evaluated"]
    all_rows = result.rows + (rows if screen else [])
    fine_tunes = {"total": len(all_rows) + len(references), "mask_evaluations": len(all_rows),
                  "references": list(references), "run_now": evaluated + doc["references_now"],
                  "without_training": sum(1 for r in all_rows if row_inner_steps(r, config.inner_steps) == 0)}
    if screen:
        fine_tunes.update(screening=len(result.rows), promoted=len(rows))
    front_doc = {"objectives": list(OBJECTIVES), "front": front, "chosen": chosen, "references": references,
                 "evaluations": len(all_rows), "evaluated_now": evaluated, "history": result.history,
                 "fine_tunes": fine_tunes, "verdict": reference_verdict(front, references),
                 "memorization": config.memorization, "quality": config.quality, "schedule": config.schedule,
                 "inner_steps_total": sum(row_inner_steps(r, config.inner_steps) for r in all_rows),
                 "latent_cache": cache_report, "workers": config.workers, "ray_address": config.ray_address,
                 "versions": vers}
    if screen:
        front_doc["screening"] = {"evaluations": len(result.rows), "steps": config.screen_steps,
                                  "promoted": len(rows), "promote": config.promote,
                                  "front": result.front}
    return front_doc


def pareto_png(rows: Sequence[dict], front: Sequence[dict], chosen: dict | None, references: dict,
               config: SearchConfig) -> bytes:
    """The evaluations, the front, the chosen mask and the references, memorization against quality (PNG bytes)."""
    fig = new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    x = [r["objectives"]["memorization"] for r in rows]
    y = [r["objectives"]["quality"] for r in rows]
    ax.scatter(x, y, s=14, c="#9aa5b1", label=f"evaluations ({len(rows)})")
    f = sorted(front, key=lambda r: r["objectives"]["memorization"])
    ax.plot([r["objectives"]["memorization"] for r in f], [r["objectives"]["quality"] for r in f], "o-", c="#c0392b",
            ms=5, label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen["objectives"]["memorization"]], [chosen["objectives"]["quality"]], s=120, facecolors="none",
                   edgecolors="#c0392b", linewidths=2, label="chosen")
    for (name, r), marker in zip(references.items(), ("s", "^")):
        ax.scatter([r["objectives"]["memorization"]], [r["objectives"]["quality"]], marker=marker, s=60, c="#2c3e50",
                   label=name)
    ax.set_xlabel(f"memorization ({config.memorization}; lower is better)")
    ax.set_ylabel(f"quality ({config.quality.upper()}, {config.quality_features}; lower is better)")
    ax.set_title(f"MemControl mask search: {config.method}, {config.granularity} units")
    ax.legend(fontsize=8)
    return figure_png(fig)
