"""``memaudit finetune``: fine-tune a checkpoint on image-caption data, optionally with a training-time mitigation.

The result is a diffusers pipeline folder (loadable by plain diffusers) with ``memaudit_finetune.json`` beside the
components: every setting, the seed, versions, the base checkpoint, the data, what the mitigation did (captions
perturbed, samples dropped) and whether the images' latents were encoded now or found in the latent cache
(:mod:`memaudit.latents`, in memaudit's cache folder, reused by every later fine-tune on the same images).

While training, the run lives in ``OUT.partial/`` (its settings and resumable checkpoints). Running the same command
again after a crash or Ctrl-C continues from the last checkpoint and ends at the same weights as an uninterrupted
run; running it with other settings is refused rather than mixed. ``OUT`` itself appears only when training has
finished, in one atomic step, and ``OUT.partial/`` is then removed.

Mitigations (training time, see :mod:`memaudit.baselines`): ``rwa`` (random word addition, re-drawn every step) and
``threshold`` (samples whose denoising strength is at or above a threshold leave the loss).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from memaudit.baselines.rwa import RWAHook
from memaudit.baselines.rwa import check_settings as check_rwa
from memaudit.baselines.threshold import ThresholdHook
from memaudit.core.devices import resolve_dtype
from memaudit.core.digests import tree_digest
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_json, check_writable
from memaudit.core.outputs import (
    check_cache,
    check_clear,
    check_output,
    check_partial,
    dataset_inputs,
    output_directory,
    partial_dir,
)
from memaudit.core.provenance import versions
from memaudit.core.runs import differences, listed
from memaudit.core.settings import setting, shared
from memaudit.data import dataset_for_target
from memaudit.latents import latent_cache_root, latents_for
from memaudit.peft import GRANULARITIES, available_methods, get_method, method_class, save_adapter
from memaudit.peft.lora import save_diffusers_lora
from memaudit.target import load_target
from memaudit.training import RunClock, TrainConfig, latest_checkpoint, train_denoiser

logger = logging.getLogger(__name__)

LORA_DIR = "lora"  # --method lora: the adapter in diffusers' LoRA format (pipe.load_lora_weights(OUT/lora))
SETTINGS_FILE = "memaudit_finetune.json"
MITIGATIONS = ("none", "rwa", "threshold")
ADAPTER_DIR = "adapter"
SAVE_DTYPES = ("float32", "float16", "bfloat16")

Progress = Callable[[int, int, dict], None]



@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune`; each field's ``help`` metadata documents it."""

    method: str = setting('which parameters train: full, freeze, bias, norm, attention, svdiff, difffit, lora', default="full")
    granularity: str = setting("mask units of the method: block or layer", default="block")
    mask: list | None = setting('0/1 per unit of the method, e.g. 0110100 (default: all units)', default=None)
    mask_units: dict | None = setting("what the mask was made for, as mask.json records it "
                                    "(memaudit.mitigate.finetune.mask_units; None: not checked)", default=None)
    mitigation: str = setting("training-time mitigation: none, rwa or threshold", default="none")
    steps: int = shared(TrainConfig, "steps")
    batch_size: int = shared(TrainConfig, "batch_size", "images per step")
    learning_rate: float | None = shared(TrainConfig, "learning_rate", "AdamW learning rate (constant; None: the "
                                         "method's default)", differs="each PEFT method has its own", default=None)
    seed: int = shared(TrainConfig, "seed", 'seed of every random draw')
    caption_dropout: float = shared(TrainConfig, "caption_dropout", "probability of training on the empty prompt "
                                    "(for guidance)")
    mixed_precision: str = shared(TrainConfig, "mixed_precision")
    checkpoint_every: int = shared(TrainConfig, "checkpoint_every", "write a resumable checkpoint every N steps",
                                   differs="a user's fine-tune resumes after a crash; the library's own short "
                                   "trainings (demo build, tests) checkpoint only at the end", default=100)
    rwa_words: int = setting("rwa: random tokens inserted per caption", default=2)
    rwa_probability: float = setting('rwa: probability a caption is perturbed at a step', default=0.5)
    threshold: float | str = setting('threshold: strength at/above which samples drop, or auto (top decile)', default="auto")
    threshold_quantile: float = setting("threshold: the batch quantile of 'auto'", default=0.9)
    save_dtype: str = setting('dtype of the saved denoiser and VAE: float32, float16, bfloat16', default="float32")
    loras: list = setting("LoRA adapters fused into the base before training: [[path, scale], ...]", default_factory=list)

    def __post_init__(self):
        if self.method not in available_methods():
            raise ConfigError(f"--method {self.method!r} is not known; use one of: {', '.join(available_methods())}.")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"--granularity {self.granularity!r} is not known; use block or layer.")
        if self.mask is not None:
            self.mask = [int(b) for b in self.mask] if all(b in (0, 1) for b in self.mask) else None
            if self.mask is None:
                raise ConfigError("the mask must be a list of 0/1 values, one per unit of the method.")
        if self.learning_rate is None:
            self.learning_rate = method_class(self.method).default_lr
        if self.mitigation not in MITIGATIONS:
            raise ConfigError(f"--mitigation {self.mitigation!r} is not known; use one of: {', '.join(MITIGATIONS)}.")
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save dtype {self.save_dtype!r} is not known; use one of: {', '.join(SAVE_DTYPES)}.")
        if self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be at least 1.")
        if isinstance(self.threshold, str) and self.threshold != "auto":
            try:
                self.threshold = float(self.threshold)
            except ValueError:
                raise ConfigError(f"--threshold must be a number or 'auto' (got {self.threshold!r}).") from None
        if not isinstance(self.threshold, str) and not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"--threshold must be positive (got {self.threshold!r}).")
        check_rwa(self.rwa_words, self.rwa_probability)
        self.train_config()  # validates the shared training settings

    def train_config(self) -> TrainConfig:
        """The training loop's settings: the fields shared with :class:`TrainConfig`, one checkpoint kept."""
        own = {f.name: getattr(self, f.name) for f in fields(self)
               if f.metadata.get("shared_from", "").startswith("TrainConfig.")}
        return TrainConfig(**own, keep_checkpoints=1, log_every=0)

    def to_dict(self) -> dict:
        return asdict(self)


def mitigation_hooks(config: FinetuneConfig, target) -> list:
    """The training hooks of ``config.mitigation``."""
    if config.mitigation == "rwa":
        return [RWAHook(target.tokenizer, k=config.rwa_words, p=config.rwa_probability)]
    if config.mitigation == "threshold":
        return [ThresholdHook(config.threshold, quantile=config.threshold_quantile)]
    return []


def install_method(config: FinetuneConfig, target, base: str | None = None):
    """Build ``config.method`` on ``target.denoiser`` (in place) and return it with the parameters its mask trains;
    ``base`` names the model in the message about a mask of the wrong length."""
    method = get_method(config.method, target.denoiser, config.granularity, base=base)
    mask = config.mask if config.mask is not None else [1] * len(method.units())
    return method, method.parameters_for(mask, config.mask_units)


def _identity(base, dataset_source: str, config: FinetuneConfig, data_key: str) -> dict:
    """What must match for a run to resume another: settings, base checkpoint and data content."""
    base_id = str(Path(base).resolve()) if Path(base).exists() else str(base)
    source = str(Path(dataset_source).resolve()) if Path(dataset_source).exists() else dataset_source
    base_sha256 = tree_digest(base) if Path(base).is_dir() else None  # a base changed in place is another base
    return {"base": base_id, "base_sha256": base_sha256, "train": source, "train_sha256": data_key,
            "settings": config.to_dict()}


def finetune(base, train, out: str | Path, config: FinetuneConfig | None = None, *, device: str = "auto",
             convert_channels: bool = False, overwrite: bool = False, progress: Progress | None = None,
             cache_dir: str | Path | None = None, cache_progress: Callable[[int, int], None] | None = None,
             reads: Sequence[tuple[str, str | os.PathLike]] = ()) -> dict:
    """Fine-tune ``base`` (a pipeline folder or a hub id in the local cache) on ``train`` (a folder, captions
    file or :class:`~memaudit.data.ImageCaptionDataset`) and write the pipeline folder ``out``.

    Resumes from ``out.partial/`` when it holds checkpoints of the same run. Returns the settings dict that is also
    written to ``out/memaudit_finetune.json``; its ``latent_cache`` says whether the images' VAE latents were
    encoded now or found in the latent cache in ``cache_dir`` (default: memaudit's cache folder; see
    :mod:`memaudit.latents`), and where it is. ``cache_progress(done, total)`` counts the images encoded. The cache is
    filled before anything of the run is written, so an unreadable image stops the run with nothing to clean up.
    ``reads``: other files the run reads (``("--mask", path)``), which ``out`` must stay clear of like the inputs.
    """
    config = config or FinetuneConfig()
    cache_root = check_writable(latent_cache_root(cache_dir), "--cache-dir")
    out = _check_outputs(base, train, out, config, cache_root, reads, overwrite)

    target = load_target(base, device=device, dtype="float32", loras=config.loras)
    dataset, source = dataset_for_target(train, target, convert_channels)
    check_clear(out, dataset_inputs(dataset, "the training images"))  # a captions file can name images anywhere
    check_clear(partial_dir(out), dataset_inputs(dataset, "the training images"), "--out's work folder")
    data_key = dataset.content_key(captions=True)  # the images' contents and the captions
    identity = _identity(base, source, config, data_key)

    hooks = mitigation_hooks(config, target)
    # a mask that does not fit stops here, before anything is written
    method, params = install_method(config, target, base=str(base))

    work = partial_dir(out)
    run_file = work / "run.json"
    resuming = run_file.is_file()
    if resuming:
        _check_same_run(work, run_file, identity)
    # the images' latents, before anything of the run is written (nothing to encode when nothing trains)
    latents = latents_for(target, dataset, cache_dir, progress=cache_progress) if params else None
    if not resuming:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_file, identity)
    resumed_from = latest_checkpoint(work / "checkpoints")
    clock = RunClock(work / "wall.json")

    n_train = sum(p.numel() for p in params)
    n_denoiser = method.denoiser_parameters
    result = _train(target, dataset, config, params, hooks, latents, work, progress, clock)
    settings = {
        "kind": "memaudit.finetune", "schema_version": 1,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **identity,
        "seeds": {"seed": config.seed, "note": "every random draw of training comes from one CPU generator seeded "
                                               "with this seed (data order, noise, timesteps, caption dropout, RWA)"},
        "versions": versions(),
        "device": str(target.device),
        "trainable_parameters": n_train, "unet_parameters": n_denoiser,
        "trainable_percent": 100.0 * n_train / n_denoiser,
        "method": method.summary() | {"units": [u.name for u in method.units()]},
        "result": _result_summary(result, resumed_from, clock.total()),
        "latent_cache": latents.report if latents is not None else None,
    }
    _write_output(out, target, method, config, identity, result, settings)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("fine-tuned %s for %d steps -> %s", base, result.steps, out)
    return settings


def _check_outputs(base, train, out: str | Path, config: FinetuneConfig, cache_root: Path,
                   reads: Sequence[tuple[str, str | os.PathLike]], overwrite: bool) -> Path:
    """``out``, checked: nothing the user gave is written over, and only a fine-tune memaudit wrote is replaced
    (with ``overwrite``)."""
    named = [("the base model", base if isinstance(base, (str, os.PathLike)) else None),
             ("--train", train if isinstance(train, (str, os.PathLike)) else None), ("--cache-dir", cache_root.parent),
             *[("--lora", lora[0]) for lora in config.loras], *reads]
    out = check_output(out, "finetune", named, partial=partial_dir(out))
    check_cache(cache_root.parent, named)
    check_partial(partial_dir(out), "run.json", "the fine-tune")
    if (out / SETTINGS_FILE).is_file() and not overwrite:
        raise ConfigError(f"--out {out} already holds a finished fine-tune; pass --overwrite to replace it, or another "
                          "--out.")
    return out


def _check_same_run(work: Path, run_file: Path, identity: dict) -> None:
    """ConfigError unless the unfinished run in ``work`` (its ``run.json``) is the one ``identity`` describes."""
    try:
        earlier = json.loads(run_file.read_text())
    except ValueError:
        earlier = None
    if earlier != identity:
        names = differences(earlier if isinstance(earlier, dict) else {}, identity,
                            parts={"base_sha256": "the base model's files", "train_sha256": "the training images"})
        raise ConfigError(f"{work} holds an unfinished fine-tune with other settings, base or data (differing: "
                          f"{listed(names) or 'its format'}); run the same command as before to resume it, or "
                          f"delete {work} to start over.")


def _train(target, dataset, config: FinetuneConfig, params: list, hooks: list, latents, work: Path,
           progress: Progress | None, clock: RunClock):
    """Train ``params`` (none: nothing trains) with checkpoints in ``work``, where the run's wall time so far is
    written beside each checkpoint (``clock``); returns the training result."""
    on_progress = clock.progress(config.checkpoint_every, progress)

    if params:
        result = train_denoiser(target, dataset, config.train_config(), params=params, hooks=hooks,
                                progress=on_progress, checkpoint_dir=work / "checkpoints", resume=True,
                                save_pipeline=_no_pipeline, latents=latents)
        latents.close()
        return result
    # an all-zero mask (or the freeze method): nothing trains, the result is the base model
    logger.warning("the mask switches every unit of %s off: nothing to train, writing the base model", config.method)
    return _Untrained()


def _result_summary(result, resumed_from: Path | None, wall_time_s: float) -> dict:
    """The ``result`` entry of the settings: steps, losses, statistics, the step resumed from and the wall time."""
    return {"steps": result.steps, "final_loss": result.final_loss,
            "mean_loss_last_100": (sum(result.losses[-100:]) / len(result.losses[-100:])) if result.losses else None,
            "skipped_steps": result.skipped_steps, "stats": result.stats,
            "resumed_from_step": int(resumed_from.name.split("-")[1]) if resumed_from else None,
            "wall_time_s": wall_time_s}


def _write_output(out: Path, target, method, config: FinetuneConfig, identity: dict, result, settings: dict) -> None:
    """Write the fine-tuned pipeline folder ``out`` in one atomic step: the adapter (any method but full), the LoRA
    in diffusers' format (lora), the merged pipeline and the settings (``settings`` gains the folders written)."""
    save_dtype = resolve_dtype(config.save_dtype)
    with output_directory(out, "finetune") as tmp:
        if config.method != "full":
            save_adapter(method, tmp / ADAPTER_DIR, base=identity["base"], mask=config.mask,
                         learning_rate=config.learning_rate, steps=result.steps, seed=config.seed,
                         extra={"mitigation": config.mitigation})
            settings["adapter"] = ADAPTER_DIR
        if config.method == "lora":
            save_diffusers_lora(target, tmp / LORA_DIR)
            settings["diffusers_lora"] = LORA_DIR
        method.merge()
        target.save(tmp / "pipeline", dtype=save_dtype)
        for item in list((tmp / "pipeline").iterdir()):
            item.rename(tmp / item.name)
        (tmp / "pipeline").rmdir()
        atomic_write_json(tmp / SETTINGS_FILE, settings)


class _Untrained:
    steps, final_loss, losses, skipped_steps, stats = 0, None, [], 0, {}


def _no_pipeline(target, path: Path) -> None:
    """Checkpoints keep only the trained parameters and optimizer state: a full pipeline copy per checkpoint would
    cost disk (4 GB for Stable Diffusion) and nothing for resuming."""
