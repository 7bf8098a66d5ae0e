"""The one training loop every method shares.

:func:`train_unet` fine-tunes (or trains from scratch) the UNet of a :class:`~memaudit.target.Target` on an
image-caption dataset with the Stable Diffusion objective: AdamW at a constant learning rate, gradient clipping,
caption dropout for classifier-free guidance, gradient accumulation, mixed precision on CUDA, every random draw
from one seeded CPU generator. The images' VAE posteriors come from the latent cache on disk
(:mod:`memaudit.latents`: each image is encoded once, for every later run on it) and are read a batch at a time, so
the size of the training set is bounded by the disk, not the memory. Later features plug in through
:class:`TrainHook` (random word addition edits the captions, threshold mitigation weights the per-sample loss,
parameter masks edit the gradients) and through the ``params`` argument (which parameters are trained). Checkpoints are diffusers pipeline folders written atomically,
plus the optimizer, generator and hook states, so an interrupted run resumes where it stopped and ends at the
same weights. Each checkpoint lists its files and sizes (``manifest.json``); a resume skips a damaged one (a file
truncated or missing, or a training state whose CRCs fail) for the previous intact one with a warning, and when none
is intact says in one line which folder to delete (:func:`checkpoint_problem`).

:func:`train_vae` trains an autoencoder from scratch with the same conventions; it is used to build the bundled
demo model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from memaudit.core.errors import ConfigError
from memaudit.families import Conditioning

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, dict], None]
STATE_FILE = "training_state.pt"
#: the files of a checkpoint and their sizes, written last inside it (see :func:`checkpoint_problem`)
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"step-\d+")
# the training states' CRC checks, by path and stat (a file that changes is checked again)
_CRC_CHECKED: dict[tuple, str | None] = {}
_WARNED: set[tuple[str, str, str]] = set()


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Settings of :func:`train_unet`; each field's ``help`` metadata is its documentation."""

    steps: int = _help("optimizer steps", default=1000)
    batch_size: int = _help("images per micro-batch", default=32)
    learning_rate: float = _help("AdamW learning rate (constant)", default=1e-4)
    weight_decay: float = _help("AdamW weight decay", default=1e-2)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help("clip the gradient norm to this (0: no clipping)", default=1.0)
    caption_dropout: float = _help("probability of replacing a caption by the empty prompt (for guidance)", default=0.1)
    gradient_accumulation: int = _help("micro-batches per optimizer step", default=1)
    mixed_precision: str = _help("no, fp16 or bf16 autocast (CUDA only)", default="no")
    seed: int = _help("seed of every random draw of the run", default=0)
    checkpoint_every: int = _help("write a resumable checkpoint every N steps (0: only at the end)", default=0)
    keep_checkpoints: int = _help("how many checkpoints to keep", default=1)
    train_text_encoder: bool = _help("also train the text encoder (building a model from scratch)", default=False)
    log_every: int = _help("report the running loss every N steps", default=50)

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be a positive number"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1)"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be at least 1"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"training setting invalid: {msg}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class Batch:
    """One micro-batch as hooks see it: dataset indices, clean scaled latents and captions."""

    indices: torch.Tensor
    latents: torch.Tensor
    captions: list[str]


@dataclass
class LossContext:
    """Everything about a micro-batch's forward pass, for hooks that weight samples (threshold mitigation)."""

    batch: Batch
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    embeddings: Conditioning
    output: torch.Tensor
    per_sample_loss: torch.Tensor


@dataclass
class TrainState:
    """The mutable state of a run; hooks may read it (and keep their own counters in ``stats``)."""

    target: object
    config: TrainConfig
    params: list
    generator: torch.Generator
    step: int = 0
    skipped_steps: int = 0
    stats: dict = field(default_factory=dict)


class TrainHook:
    """Extension point of :func:`train_unet`; override what you need. Hooks run in the order given."""

    name = "hook"

    def on_start(self, state: TrainState) -> None:
        """Once, before the first step (after a resume, too)."""

    def on_batch(self, batch: Batch, state: TrainState) -> Batch:
        """Edit a micro-batch before the forward pass (e.g. captions); draw randomness from ``state.generator``."""
        return batch

    def sample_weights(self, ctx: LossContext, state: TrainState) -> torch.Tensor | None:
        """Per-sample loss weights (``None``: all ones). A sample of weight 0 does not train."""
        return None

    def on_gradients(self, state: TrainState) -> None:
        """After backward and before clipping and the optimizer step (e.g. mask gradients)."""

    def on_step_end(self, state: TrainState, logs: dict) -> None:
        """After each optimizer step; ``logs`` holds the step's loss."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float]
    skipped_steps: int
    wall_time_s: float
    config: dict
    stats: dict
    latent_cache: dict = field(default_factory=dict)  # the latent cache's report (memaudit.latents.latents_for)


class _IndexStream:
    """Concatenated seeded permutations of the dataset: every image is seen equally often."""

    def __init__(self, n: int):
        self.n, self.buffer = n, torch.empty(0, dtype=torch.long)

    def take(self, k: int, generator: torch.Generator) -> torch.Tensor:
        while len(self.buffer) < k:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=generator)])
        out, self.buffer = self.buffer[:k], self.buffer[k:]
        return out


def _select_params(target, params, train_text_encoder: bool) -> list[torch.nn.Parameter]:
    if params is None:
        chosen = list(target.unet.parameters())
    elif callable(params):
        chosen = list(params(target))
    else:
        chosen = list(params)
    if train_text_encoder:
        chosen += [p for p in target.text_encoder.parameters() if all(p is not q for q in chosen)]
    if not chosen:
        raise ConfigError("nothing to train: the trainable parameter set is empty.")
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def autocast(config: TrainConfig, device: torch.device):
    if config.mixed_precision == "no" or device.type != "cuda":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type="cuda", dtype=torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16)


def checkpoint_dirs(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints in ``checkpoint_dir`` (folders ``step-N`` holding a training state), oldest first; see
    :func:`checkpoint_problem` for whether one is intact."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the checkpoint folder ``path``, in a few words (None: it is intact).

    Two checks: every file the checkpoint was written with (``manifest.json``, written last inside the checkpoint)
    is there with its size (a truncated or deleted file, pipeline weights included), and every record of the training
    state (a zip archive) matches the CRC-32 torch stored for it (a file damaged in place; this reads the state once
    per process, and again only when the file changes). Checkpoints written before the manifest get the second check
    only."""
    import zipfile

    path = Path(path)
    state = path / STATE_FILE
    if not state.is_file():
        return f"it has no {STATE_FILE}"
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = {str(k): int(v) for k, v in json.loads(manifest.read_text())["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"its {MANIFEST_FILE} is unreadable"
        for rel, size in sizes.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} is {f.stat().st_size:,} bytes where {size:,} were written"
    st = state.stat()
    stamp = (str(state.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if stamp not in _CRC_CHECKED:
        try:
            with zipfile.ZipFile(state) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            _CRC_CHECKED[stamp] = f"{STATE_FILE} is not a complete torch file ({why})"
        else:
            _CRC_CHECKED[stamp] = None if bad is None else f"{STATE_FILE} is damaged ({bad} fails its CRC check)"
    return _CRC_CHECKED[stamp]


def _candidates(root: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one the ``latest`` pointer names, then the others newest first."""
    found = checkpoint_dirs(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def _note_skipped(skipped: list[tuple[Path, str]], chosen: Path | None) -> None:
    for path, why in skipped:
        key = (str(path), why, str(chosen))
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning("checkpoint %s is damaged (%s): skipped, %s", path, why,
                           f"resuming from {chosen.name}" if chosen is not None else "and no earlier one is intact")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: the one the ``latest`` pointer names (written last, atomically), else the newest
    complete one; a damaged one (:func:`checkpoint_problem`) is skipped with a warning naming it and why."""
    root = Path(checkpoint_dir)
    skipped = []
    for candidate in _candidates(root):
        why = checkpoint_problem(candidate)
        if why is None:
            _note_skipped(skipped, candidate)
            return candidate
        skipped.append((candidate, why))
    _note_skipped(skipped, None)
    return None


def _named_trainables(target, params: Sequence[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in params}
    named: dict[str, torch.nn.Parameter] = {}
    modules = [("unet", target.unet)] + [(n, m) for n, m in target.modules() if m is not target.unet]
    for prefix, module in modules:
        for name, p in module.named_parameters():
            if id(p) in ids:
                named.setdefault(f"{prefix}.{name}", p)
    return named


def save_checkpoint(state: TrainState, optimizer, scaler, hooks: Sequence[TrainHook], checkpoint_dir, losses,
                    save_pipeline: Callable[[object, Path], None] | None = None) -> Path:
    """Write ``step-N/`` (pipeline folder + training state) atomically, then move the ``latest`` pointer."""
    from memaudit.core.io import atomic_directory, atomic_write_text

    root = Path(checkpoint_dir)
    path = root / f"step-{state.step:07d}"
    with atomic_directory(path) as tmp:
        (save_pipeline or _save_pipeline)(state.target, tmp / "pipeline")
        named = _named_trainables(state.target, state.params)
        torch.save(
            {
                "step": state.step,
                "skipped_steps": state.skipped_steps,
                "stats": state.stats,
                "losses": list(losses),
                "params": {k: v.detach().cpu().clone() for k, v in named.items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "generator": state.generator.get_state(),
                "hooks": [h.state_dict() for h in hooks],
                "config": state.config.to_dict(),
            },
            tmp / STATE_FILE,
        )
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")
    atomic_write_text(root / LATEST, path.name)
    for old in checkpoint_dirs(root)[: -state.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _save_pipeline(target, path: Path) -> None:
    target.pipeline().save_pretrained(path, safe_serialization=True)


#: what a checkpoint's training state must hold
_STATE_KEYS = ("step", "skipped_steps", "stats", "losses", "params", "optimizer", "scaler", "generator", "hooks")


def _read_state(path: Path) -> dict:
    """The training state of checkpoint ``path``; ValueError (with what is wrong) when it cannot be used."""
    import pickle
    import zipfile

    try:
        blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{STATE_FILE} could not be read: {why}") from e
    lacking = [k for k in _STATE_KEYS if not isinstance(blob, dict) or k not in blob]
    if lacking:
        raise ValueError(f"{STATE_FILE} lacks {lacking[0]!r}")
    return blob


def _resume_point(checkpoint_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that is intact and readable, with its training state (None, None: there is none).

    Damaged ones are skipped with a warning; when every checkpoint is damaged, a ConfigError says which folder to
    delete to start the run over."""
    root = Path(checkpoint_dir)
    skipped: list[tuple[Path, str]] = []
    for candidate in _candidates(root):
        why = checkpoint_problem(candidate)
        if why is None:
            try:
                blob = _read_state(candidate)
            except ValueError as e:
                why = str(e)
            else:
                _note_skipped(skipped, candidate)
                return candidate, blob
        skipped.append((candidate, why))
    if skipped:
        _note_skipped(skipped, None)
        path, why = skipped[0]
        more = f" (and {len(skipped) - 1} earlier one(s))" if len(skipped) > 1 else ""
        raise ConfigError(f"no checkpoint in {root} can be resumed: {path.name} is damaged ({why}){more}; delete "
                          f"{root} to start the run over.")
    return None, None


def _load_checkpoint(path: Path, blob: dict, state: TrainState, optimizer, scaler,
                     hooks: Sequence[TrainHook]) -> list[float]:
    named = _named_trainables(state.target, state.params)
    missing = set(named) - set(blob["params"])
    if missing:
        raise ConfigError(
            f"checkpoint {path} does not match this run (it lacks {sorted(missing)[0]}); "
            "use another output folder or delete the checkpoint to start over."
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(blob["params"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    state.generator.set_state(blob["generator"])
    state.step, state.skipped_steps, state.stats = blob["step"], blob["skipped_steps"], blob["stats"]
    for hook, hs in zip(hooks, blob["hooks"]):
        hook.load_state_dict(hs)
    return list(blob["losses"])


def train_unet(
    target,
    dataset,
    config: TrainConfig | None = None,
    *,
    params: Iterable[torch.nn.Parameter] | Callable | None = None,
    hooks: Sequence[TrainHook] = (),
    progress: Progress | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    save_pipeline: Callable[[object, Path], None] | None = None,
    cache_dir: str | os.PathLike | None = None,
    latents=None,
    cache_progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Fine-tune ``target.unet`` (and optionally its text encoder) on ``dataset`` (images in [-1, 1] + captions).

    ``params`` chooses what trains (default: every UNet parameter); everything else stays frozen. With a
    ``checkpoint_dir``, checkpoints are written every ``config.checkpoint_every`` steps and at the end, and with
    ``resume`` a run continues from the latest one there. ``progress(step, total, logs)`` is called every step.

    The images' VAE posteriors come from the latent cache in ``cache_dir`` (default: memaudit's cache folder, see
    :mod:`memaudit.latents`), which encodes the images it lacks first (``cache_progress(done, total)`` in images);
    ``latents`` passes posteriors already looked up (:func:`memaudit.latents.latents_for` on the same target and
    dataset). Each batch's latents are read from disk when it is drawn: the set is never in memory.
    """
    from memaudit.latents import latents_for

    config = config or TrainConfig()
    if len(dataset) == 0:
        raise ConfigError("the training set is empty.")
    if dataset.channels != target.image_channels:
        raise ConfigError(
            f"the training images have {dataset.channels} channel(s) but the model makes "
            f"{target.image_channels}; load the data with channels={target.image_channels}."
        )
    if target.dtype != torch.float32:
        raise ConfigError("train a float32 target; use mixed_precision='fp16' or 'bf16' for half-precision speed.")
    if config.mixed_precision != "no" and target.device.type != "cuda":
        logger.warning("mixed precision %s needs CUDA; training in float32 on %s", config.mixed_precision, target.device)

    start = time.perf_counter()
    if latents is None:
        latents = latents_for(target, dataset, cache_dir, progress=cache_progress)
    elif len(latents) != len(dataset):
        raise ConfigError(f"the latents passed hold {len(latents)} images but the training set has {len(dataset)}.")
    device = target.device
    generator = torch.Generator().manual_seed(config.seed)
    chosen = _select_params(target, params, config.train_text_encoder)
    optimizer = torch.optim.AdamW(chosen, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    use_scaler = config.mixed_precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    state = TrainState(target=target, config=config, params=chosen, generator=generator)
    losses: list[float] = []
    if checkpoint_dir is not None and not resume:
        # Starting over: checkpoints of an earlier run in this folder would be mistaken for this run's.
        for old in checkpoint_dirs(checkpoint_dir):
            logger.warning("resume=False: removing earlier checkpoint %s", old)
            shutil.rmtree(old, ignore_errors=True)
        (Path(checkpoint_dir) / LATEST).unlink(missing_ok=True)
    if checkpoint_dir is not None and resume:
        ckpt, blob = _resume_point(checkpoint_dir)
        if ckpt is not None:
            losses = _load_checkpoint(ckpt, blob, state, optimizer, scaler, hooks)
            logger.info("resumed from %s at step %d", ckpt, state.step)

    stream = _IndexStream(len(dataset))
    # Replay the index stream up to the resumed step so the data order is the same as an uninterrupted run.
    # (The generator state is restored from the checkpoint; the stream's buffer is rebuilt deterministically.)
    stream_state = state.stats.get("_stream_buffer")
    if stream_state is not None:
        stream.buffer = torch.tensor(stream_state, dtype=torch.long)

    target.unet.train()
    if config.train_text_encoder:
        target.text_encoder.train()
    for hook in hooks:
        hook.on_start(state)

    running = None
    while state.step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss, kept_any = 0.0, False
        for _ in range(config.gradient_accumulation):
            idx = stream.take(config.batch_size, generator)
            x = latents.sample(idx, generator)
            captions = [dataset.captions[i] for i in idx.tolist()]
            drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            batch = Batch(indices=idx, latents=x, captions=captions)
            for hook in hooks:
                batch = hook.on_batch(batch, state)
            noise = torch.randn(batch.latents.shape, generator=generator)
            t = target.sample_timesteps(len(batch.captions), generator)
            x0 = batch.latents
            noisy = target.add_noise(x0, noise, t)
            goal = target.training_target(x0, noise, t)
            x0, noise, noisy, goal, t_dev = (v.to(device) for v in (x0, noise, noisy, goal, t))
            with autocast(config, device):
                if config.train_text_encoder:
                    emb = target.embed(batch.captions)
                else:
                    emb = target.encode_prompts(batch.captions)
                output = target.denoise(noisy, t_dev, emb)
            per_sample = (output.float() - goal).pow(2).flatten(1).mean(1)
            weights = torch.ones_like(per_sample)
            ctx = LossContext(batch=batch, noise=noise, timesteps=t_dev, noisy=noisy, embeddings=emb,
                              output=output, per_sample_loss=per_sample)
            for hook in hooks:
                w = hook.sample_weights(ctx, state)
                if w is not None:
                    weights = weights * w.to(weights)
            if float(weights.sum()) <= 0:
                continue
            kept_any = True
            loss = (weights * per_sample).sum() / weights.sum() / config.gradient_accumulation
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += float(loss.detach())
        if not kept_any:
            state.skipped_steps += 1
            state.step += 1
            logs = {"loss": float("nan"), "skipped": True}
        else:
            if scaler:
                scaler.unscale_(optimizer)
            for hook in hooks:
                hook.on_gradients(state)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(chosen, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            state.step += 1
            losses.append(step_loss)
            running = step_loss if running is None else 0.98 * running + 0.02 * step_loss
            logs = {"loss": step_loss, "running_loss": running}
        if config.train_text_encoder:
            target.clear_prompt_cache()
        for hook in hooks:
            hook.on_step_end(state, logs)
        if progress is not None:
            progress(state.step, config.steps, logs)
        if config.log_every and state.step % config.log_every == 0:
            logger.info("step %d/%d loss %.4f", state.step, config.steps, running or float("nan"))
        at_end = state.step >= config.steps
        if checkpoint_dir is not None and (at_end or (config.checkpoint_every and state.step % config.checkpoint_every == 0)):
            state.stats["_stream_buffer"] = stream.buffer.tolist()
            save_checkpoint(state, optimizer, scaler, hooks, checkpoint_dir, losses, save_pipeline)

    target.unet.eval()
    for encoder in target.text_encoders:
        encoder.eval()
    for p in chosen:
        p.requires_grad_(False)
    target.clear_prompt_cache()
    stats = {k: v for k, v in state.stats.items() if not k.startswith("_")}
    return TrainResult(steps=state.step, final_loss=losses[-1] if losses else float("nan"), losses=losses,
                       skipped_steps=state.skipped_steps, wall_time_s=time.perf_counter() - start,
                       config=config.to_dict(), stats=stats, latent_cache=dict(latents.report))


@dataclass
class VAEConfig:
    """Settings of :func:`train_vae`."""

    steps: int = _help("optimizer steps", default=1200)
    batch_size: int = _help("images per batch", default=64)
    learning_rate: float = _help("AdamW learning rate", default=1e-3)
    kl_weight: float = _help("weight of the KL term (Stable Diffusion's VAE uses about 1e-6)", default=1e-6)
    max_grad_norm: float = _help("gradient clipping", default=1.0)
    seed: int = _help("seed", default=0)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError("VAE training settings invalid: steps and batch_size must be >= 1, learning_rate > 0.")

    def to_dict(self) -> dict:
        return asdict(self)


def train_vae(vae, images: torch.Tensor, config: VAEConfig | None = None, *, device: str | torch.device = "cpu",
              progress: Progress | None = None) -> TrainResult:
    """Train an ``AutoencoderKL`` on images in [-1, 1] (reconstruction MSE + a small KL term)."""
    config = config or VAEConfig()
    start = time.perf_counter()
    device = torch.device(device)
    generator = torch.Generator().manual_seed(config.seed)
    vae.to(device).train()
    vae.requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    stream = _IndexStream(len(images))
    losses = []
    for step in range(1, config.steps + 1):
        idx = stream.take(config.batch_size, generator)
        x = images[idx].to(device)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(device)
        recon = vae.decode(z).sample
        rec = (recon - x).pow(2).mean()
        kl = dist.kl().mean() / x[0].numel()
        loss = rec + config.kl_weight * kl * x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
        optimizer.step()
        losses.append(float(rec.detach()))
        if progress is not None:
            progress(step, config.steps, {"loss": losses[-1]})
    vae.eval()
    vae.requires_grad_(False)
    return TrainResult(steps=config.steps, final_loss=losses[-1], losses=losses, skipped_steps=0,
                       wall_time_s=time.perf_counter() - start, config=config.to_dict(), stats={})
