"""The audit's recipe, :func:`run_audit`: check what needs no model, load and check every input, index the training
set, sample (and journal) the reference and audited prompts, then assemble and write the results. Each step is a
function here or in the package's other modules; the order is the audit's."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from memaudit.attacks.extraction import calibrate_edge_threshold
from memaudit.audit.assemble import Sampled, Tally, assemble_results, stacked, tally_units, train_files, verdicts_of
from memaudit.audit.config import AuditConfig, Progress
from memaudit.audit.inputs import AuditInputs, Checked, audit_identity, check_before_loading, load_inputs, model_digest
from memaudit.audit.journal import AuditJournal, journal_dir
from memaudit.audit.training import feature_batch, is_cuda, training_indexes
from memaudit.audit.units import UnitDriver
from memaudit.audit.worker import AuditWorker, InProcess, OnRay, WorkerSpec
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_bytes
from memaudit.core.outputs import output_directory
from memaudit.core.provenance import versions
from memaudit.distributed import RayWorkers, require_ray
from memaudit.images import png_bytes
from memaudit.metrics.quality import fid_from_features, kid_from_features, recommendation
from memaudit.report import write_report, write_results
from memaudit.target import Target

__all__ = ["run_audit"]

logger = logging.getLogger("memaudit.audit")  # the audit's one logger, as before it was a package


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
    config = config or AuditConfig()
    progress = progress or (lambda *_: None)
    started = time.perf_counter()
    checked = check_before_loading(model, train, out, prompts, reference_prompts, heldout, config)
    if config.workers > 1:
        _require_ray(model)

    # -- check every input before writing anything ---------------------------------------------------------------
    inputs = load_inputs(model, train, heldout, prompts, reference_prompts, checked, config, convert_channels, progress)
    pool = _ray_pool(config)  # unreachable, too small: one line, nothing written
    try:
        device_type = pool.device_type if pool is not None else torch.device(inputs.target.device).type
        journal = _open_journal(inputs, checked, config, convert_channels, device_type)
        if pool is not None:
            _start_workers(pool, model, inputs, config, device_type)

        # -- training features and image descriptors: one streamed pass over the set, both cached by content ----
        index, lookup, reused = training_indexes(inputs.dataset, inputs.extractor, config, checked.cache_dir,
                                                 inputs.here, progress)
        if pool is not None:
            executor = OnRay(pool.ready(progress))
        else:
            executor = InProcess(AuditWorker(inputs.target, config, inputs.extractor, inputs.q_extractor, inputs.scorer))
        journal.begin()
        units = UnitDriver(journal, index, lookup, config, inputs.own_of, progress)

        # -- inference-time mitigation: the threshold's target, from the reference prompts' first steps ------------
        norm_target, mitigation_info = _mitigation(config, journal, executor, inputs.reference, progress)

        # -- reference prompts: calibrate the edge threshold and the denoising threshold ----------------------
        ref_records = _reference_units(units, executor, inputs, config, norm_target)

        # -- the audited prompts --------------------------------------------------------------------------------
        records = units.run(executor, "audit", inputs.prompts, "sampling", inputs.ext_cfg.edge_threshold, norm_target)
        verdicts = verdicts_of(records)
        logger.info("the medoid checks read %d of the %d training images", lookup.images_read, len(inputs.dataset))

        # -- the nearest training images of flagged prompts, and what the model's VAE makes of them -------------
        train_images, round_trips = _nearest_training_images(verdicts, inputs, config, executor)
        sampled = Sampled(records, ref_records, verdicts, norm_target, mitigation_info, train_images, round_trips,
                          executor.machine, reused, units.resumed, journal.folder)
    except BaseException:
        if pool is not None:
            pool.close()
        raise
    if pool is not None:
        pool.close()

    # -- the results, from the journaled units ------------------------------------------------------------------
    tally = tally_units(sampled, inputs, config)
    quality = _heldout_quality(inputs, sampled.ref_records, config, progress)
    vers = versions()
    if pool is not None:
        vers["ray"] = pool.ray_version

    with output_directory(checked.out, "audit") as tmp:
        _write_images(tmp, sampled, tally, inputs, config)
        results = assemble_results(model, inputs, config, sampled, tally, quality, vers,
                                   created_utc=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                   wall_time_s=time.perf_counter() - started)
        write_results(tmp, results)
        write_report(tmp / "results.json", redact=config.redact)
    journal.remove()  # out/ is complete: the journal (with redact too) goes
    return results


def _require_ray(model) -> None:
    """A distributed audit needs Ray, and a model every worker can load: refused before anything loads."""
    require_ray()  # missing: one line naming the extra, before anything loads
    if isinstance(model, Target):
        raise ConfigError("--workers > 1 loads the model in every worker: pass its folder (or hub id), not a "
                          "loaded Target.")


def _ray_pool(config: AuditConfig):
    """The Ray workers of ``--workers N`` (not started yet), or None for ``--workers 1``."""
    if config.workers == 1:
        return None

    return RayWorkers(config.workers, address=config.ray_address, device=config.device,
                      threads=torch.get_num_threads(), what="the audit", name="audit")


def _open_journal(inputs: AuditInputs, checked: Checked, config: AuditConfig, convert_channels: bool,
                  device_type: str) -> AuditJournal:
    """The audit's journal in ``OUT.partial/``: found (a resume, refused with one line if it is another audit's) or
    new; nothing is written yet."""
    target = inputs.target
    identity = audit_identity(inputs.model_id, checked.model_sha256 or model_digest(target.path), target,
                              inputs.dataset, inputs.held, convert_channels, inputs.prompts, inputs.reference, config,
                              device_type)
    journal = AuditJournal(journal_dir(checked.out), identity, {"prompts": len(inputs.prompts),
                                                                "reference_prompts": len(inputs.reference)})
    if journal.exists:
        logger.info("resuming the audit journaled in %s", journal.folder)
    return journal


def _start_workers(pool, model, inputs: AuditInputs, config: AuditConfig, device_type: str) -> None:
    """Start one :class:`AuditWorker` per Ray actor, each loading the model itself."""
    model_arg = model if not Path(str(model)).exists() else str(Path(model).resolve())
    pool.start(AuditWorker.load, WorkerSpec(model=model_arg, loras=[[a["path"], a["scale"]] for a in inputs.target.loras],
                                            config=config.to_dict(), device=device_type,
                                            threads=pool.threads if device_type == "cpu" else None,
                                            quality=inputs.held is not None))


def _mitigation(config: AuditConfig, journal: AuditJournal, executor, reference: list[str],
                progress: Progress) -> tuple[float | None, dict | None]:
    """The threshold mitigation's target (journaled once found: a resume uses the same) and what the results say
    of the mitigation; (None, None) without one."""
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
    return norm_target, mitigation_info


def _reference_units(units: UnitDriver, executor, inputs: AuditInputs, config: AuditConfig,
                     norm_target: float | None) -> list[dict]:
    """Sample (or take from the journal) the reference prompts; with ``calibrate_edge``, set the extraction
    attack's edge threshold from their generations."""
    reference, ext_cfg = inputs.reference, inputs.ext_cfg
    ref_records = units.run(executor, "reference", reference, "reference prompts", ext_cfg.edge_threshold,
                            norm_target) if reference else []
    if config.calibrate_edge:
        ref_gens = [torch.from_numpy(g) for r in ref_records for g in r["arrays"]["small"]]
        ext_cfg.edge_threshold = calibrate_edge_threshold(ref_gens, tiles=config.tiles,
                                                          quantile=config.edge_quantile)
        logger.info("edge threshold calibrated to %.4f", ext_cfg.edge_threshold)
    return ref_records


def _nearest_training_images(verdicts: dict, inputs: AuditInputs, config: AuditConfig,
                             executor) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    """The nearest training image of every flagged prompt (none with ``redact``), and what the model's VAE makes
    of it (none for a black box)."""
    shown_train = sorted({v.nearest_train_index for v in verdicts.values()
                          if v.flagged and v.nearest_train_index is not None}) if not config.redact else []
    train_images, round_trips = {}, {}
    for t in shown_train:
        train_images[t] = inputs.dataset.read([t])  # that image only, [-1, 1]
        if not inputs.target.family.black_box:  # no VAE memaudit can drive
            round_trips[t] = np.array(executor.round_trip(train_images[t].numpy()))  # writable
    return train_images, round_trips


def _heldout_quality(inputs: AuditInputs, ref_records: list[dict], config: AuditConfig,
                     progress: Progress) -> dict | None:
    """KID and FID of the reference generations against the held-out images (None without a held-out set)."""
    held, q_extractor = inputs.held, inputs.q_extractor
    if held is None:
        return None
    progress("quality", 0, len(held))
    real = torch.cat([q_extractor((images + 1) / 2) for _, images in
                      held.batches(feature_batch(q_extractor), pin_memory=is_cuda(inputs.here),
                                   progress=lambda d, t: progress("quality", d, t))])
    quality = _quality(real, torch.from_numpy(stacked(ref_records, "q_features")), q_extractor.name, config,
                       inputs.heldout_source)
    quality["heldout_in_train"] = inputs.heldout_in_train
    return quality


def _quality(real: torch.Tensor, fake: torch.Tensor, name: str, config: AuditConfig, source) -> dict:
    kid, kid_std = kid_from_features(real, fake, subsets=config.kid_subsets, seed=config.seed)
    fid = fid_from_features(real, fake)
    recommended, note = recommendation(len(real), len(fake))
    return {"kid": kid, "kid_std": kid_std, "fid": fid, "n_real": len(real), "n_fake": len(fake),
            "feature_extractor": name, "recommended": recommended, "note": note,
            "compared": f"generations for the held-out captions against the held-out images ({source})"}


def _write_images(tmp: Path, sampled: Sampled, tally: Tally, inputs: AuditInputs, config: AuditConfig) -> None:
    """The grids of flagged prompts (from the journal), then, prompt by prompt, the nearest training image of each
    flagged one beside its VAE round trip (never with ``redact``)."""
    tile_px = inputs.target.resolution  # generations and training images are enlarged alike in the PNGs
    for i, g in tally.grids.items():
        if g is not None:
            atomic_write_bytes(tmp / g[0], (sampled.journal / AuditJournal.grid_file(i)).read_bytes())

    # -- nearest training images of flagged prompts ------------------------------------------------------
    for i in range(len(inputs.prompts)):
        v = sampled.verdicts[i]
        if v.flagged and v.nearest_train_index is not None and not config.redact:
            # at the model's resolution and the grid's scale, beside what the model's VAE makes of it (the
            # closest the model can draw it): like is compared with like
            train_rel, roundtrip_rel = train_files(v.nearest_train_index)
            if not (tmp / train_rel).exists():
                image = sampled.train_images[v.nearest_train_index]
                atomic_write_bytes(tmp / train_rel, png_bytes((image[0] + 1) / 2, tile=tile_px))
                if v.nearest_train_index in sampled.round_trips:
                    drawn = (torch.from_numpy(sampled.round_trips[v.nearest_train_index])[0] + 1) / 2
                    atomic_write_bytes(tmp / roundtrip_rel, png_bytes(drawn, tile=tile_px))
