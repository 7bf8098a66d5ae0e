"""The one training loop every method shares (:func:`train_denoiser`).

It fine-tunes (or trains from scratch) the denoiser of a :class:`~memaudit.target.Target` on an image-caption dataset
with the diffusion objective of its family: AdamW at a constant learning rate, gradient clipping, caption dropout for
classifier-free guidance, gradient accumulation, mixed precision on CUDA, every random draw from one seeded CPU
generator. The images' VAE posteriors come from the latent cache on disk (:mod:`memaudit.latents`) and are read a
batch at a time. Hooks (:mod:`memaudit.training.hooks`) and the ``params`` argument plug later features in;
checkpoints (:mod:`memaudit.training.checkpoints`) make a run resumable.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memaudit.core.errors import ConfigError
from memaudit.latents import latents_for
from memaudit.training.checkpoints import clear_checkpoints, load_checkpoint, resume_point, save_checkpoint
from memaudit.training.config import TrainConfig
from memaudit.training.hooks import Batch, LossContext, TrainHook, TrainState

# the logger keeps the name it had before the training package, so users' logs read the same
logger = logging.getLogger("memaudit.train")

__all__ = ["IndexStream", "Progress", "TrainResult", "autocast", "train_denoiser", "train_unet"]

Progress = Callable[[int, int, dict], None]


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


class IndexStream:
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


def train_denoiser(
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
    """Fine-tune ``target``'s denoiser (and optionally its text encoder) on ``dataset`` (images in [-1, 1] +
    captions).

    ``params`` chooses what trains (default: every denoiser parameter); everything else stays frozen. With a
    ``checkpoint_dir``, checkpoints are written every ``config.checkpoint_every`` steps and at the end, and with
    ``resume`` a run continues from the latest one there. ``progress(step, total, logs)`` is called every step.

    The images' VAE posteriors come from the latent cache in ``cache_dir`` (default: memaudit's cache folder, see
    :mod:`memaudit.latents`), which encodes the images it lacks first (``cache_progress(done, total)`` in images);
    ``latents`` passes posteriors already looked up (:func:`memaudit.latents.latents_for` on the same target and
    dataset). Each batch's latents are read from disk when it is drawn: the set is never in memory.
    """
    config = config or TrainConfig()
    _check_inputs(target, dataset, config)
    start = time.perf_counter()
    latents = _dataset_latents(target, dataset, latents, cache_dir, cache_progress)
    device = target.device
    generator = torch.Generator().manual_seed(config.seed)
    chosen = _select_params(target, params, config.train_text_encoder)
    optimizer = torch.optim.AdamW(chosen, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    use_scaler = config.mixed_precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    state = TrainState(target=target, config=config, params=chosen, generator=generator)
    losses = _start_or_resume(checkpoint_dir, resume, state, optimizer, scaler, hooks)
    stream = _index_stream(len(dataset), state)
    _enter_training(target, config, hooks, state)

    running = _running_loss(losses)  # a resumed run shows the running loss an uninterrupted one would
    while state.step < config.steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = _accumulate_gradients(target, dataset, latents, stream, state, hooks, scaler, device)
        if step_loss is None:
            state.skipped_steps += 1
            state.step += 1
            logs = {"loss": float("nan"), "skipped": True}
        else:
            _optimizer_step(optimizer, scaler, chosen, hooks, state)
            state.step += 1
            losses.append(step_loss)
            running = _running_loss([step_loss], running)
            logs = {"loss": step_loss, "running_loss": running}
        _report_step(target, state, hooks, logs, progress, running)
        if checkpoint_dir is not None and _checkpoint_due(state):
            state.stats["_stream_buffer"] = stream.buffer.tolist()
            save_checkpoint(state, optimizer, scaler, hooks, checkpoint_dir, losses, save_pipeline)

    _leave_training(target, chosen)
    stats = {k: v for k, v in state.stats.items() if not k.startswith("_")}
    return TrainResult(steps=state.step, final_loss=losses[-1] if losses else float("nan"), losses=losses,
                       skipped_steps=state.skipped_steps, wall_time_s=time.perf_counter() - start,
                       config=config.to_dict(), stats=stats, latent_cache=dict(latents.report))


# deprecated alias (the denoiser is not always a UNet), kept for one release
train_unet = train_denoiser


def _check_inputs(target, dataset, config: TrainConfig) -> None:
    """Refuse a training set the target cannot learn from (empty, other channels) and a half-precision target; warn
    that mixed precision needs CUDA."""
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


def _dataset_latents(target, dataset, latents, cache_dir, cache_progress):
    """The training set's VAE posteriors: ``latents`` as passed (checked against the set), else the latent cache's."""
    if latents is None:
        return latents_for(target, dataset, cache_dir, progress=cache_progress)
    if len(latents) != len(dataset):
        raise ConfigError(f"the latents passed hold {len(latents)} images but the training set has {len(dataset)}.")
    return latents


def _running_loss(losses: Sequence[float], running: float | None = None) -> float | None:
    """The exponential moving average (weight 0.02 per step) of ``losses`` continued from ``running``."""
    for loss in losses:
        running = loss if running is None else 0.98 * running + 0.02 * loss
    return running


def _start_or_resume(checkpoint_dir, resume: bool, state: TrainState, optimizer, scaler,
                     hooks: Sequence[TrainHook]) -> list[float]:
    """The losses so far: those of the latest intact checkpoint in ``checkpoint_dir`` when resuming (the run ``state``
    restored from it), else none (and without ``resume``, an earlier run's checkpoints are removed)."""
    losses: list[float] = []
    if checkpoint_dir is not None and not resume:
        # Starting over: checkpoints of an earlier run in this folder would be mistaken for this run's.
        clear_checkpoints(checkpoint_dir)
    if checkpoint_dir is not None and resume:
        ckpt, blob = resume_point(checkpoint_dir)
        if ckpt is not None:
            losses = load_checkpoint(ckpt, blob, state, optimizer, scaler, hooks)
            logger.info("resumed from %s at step %d", ckpt, state.step)
    return losses


def _index_stream(n: int, state: TrainState) -> IndexStream:
    stream = IndexStream(n)
    # Replay the index stream up to the resumed step so the data order is the same as an uninterrupted run.
    # (The generator state is restored from the checkpoint; the stream's buffer is rebuilt deterministically.)
    stream_state = state.stats.get("_stream_buffer")
    if stream_state is not None:
        stream.buffer = torch.tensor(stream_state, dtype=torch.long)
    return stream


def _enter_training(target, config: TrainConfig, hooks: Sequence[TrainHook], state: TrainState) -> None:
    target.unet.train()
    if config.train_text_encoder:
        target.text_encoder.train()
    for hook in hooks:
        hook.on_start(state)


def _accumulate_gradients(target, dataset, latents, stream: IndexStream, state: TrainState,
                          hooks: Sequence[TrainHook], scaler, device: torch.device) -> float | None:
    """Forward and backward ``config.gradient_accumulation`` micro-batches; the step's loss, or None when every
    sample of every micro-batch had weight 0 (the step is skipped)."""
    config = state.config
    step_loss, kept_any = 0.0, False
    for _ in range(config.gradient_accumulation):
        batch = _draw_batch(dataset, latents, stream, state, hooks)
        ctx = _forward(target, batch, state, device)
        weights = _sample_weights(ctx, state, hooks)
        if float(weights.sum()) <= 0:
            continue
        kept_any = True
        loss = (weights * ctx.per_sample_loss).sum() / weights.sum() / config.gradient_accumulation
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += float(loss.detach())
    return step_loss if kept_any else None


def _draw_batch(dataset, latents, stream: IndexStream, state: TrainState, hooks: Sequence[TrainHook]) -> Batch:
    """The next micro-batch: indices, sampled latents, captions (some dropped for guidance), then the hooks' edits."""
    config, generator = state.config, state.generator
    idx = stream.take(config.batch_size, generator)
    x = latents.sample(idx, generator)
    captions = [dataset.captions[i] for i in idx.tolist()]
    drop = torch.rand(len(captions), generator=generator) < config.caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    batch = Batch(indices=idx, latents=x, captions=captions)
    for hook in hooks:
        batch = hook.on_batch(batch, state)
    return batch


def _forward(target, batch: Batch, state: TrainState, device: torch.device) -> LossContext:
    """Noise the batch at random timesteps, run the denoiser, and take each sample's loss against its target."""
    config, generator = state.config, state.generator
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
    return LossContext(batch=batch, noise=noise, timesteps=t_dev, noisy=noisy, embeddings=emb,
                       output=output, per_sample_loss=per_sample)


def _sample_weights(ctx: LossContext, state: TrainState, hooks: Sequence[TrainHook]) -> torch.Tensor:
    """The product of the hooks' per-sample weights (all ones without any)."""
    weights = torch.ones_like(ctx.per_sample_loss)
    for hook in hooks:
        w = hook.sample_weights(ctx, state)
        if w is not None:
            weights = weights * w.to(weights)
    return weights


def _optimizer_step(optimizer, scaler, chosen: list[torch.nn.Parameter], hooks: Sequence[TrainHook],
                    state: TrainState) -> None:
    """Unscale, let the hooks edit the gradients, clip, step (through the scaler under fp16)."""
    if scaler:
        scaler.unscale_(optimizer)
    for hook in hooks:
        hook.on_gradients(state)
    if state.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(chosen, state.config.max_grad_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _report_step(target, state: TrainState, hooks: Sequence[TrainHook], logs: dict, progress: Progress | None,
                 running: float | None) -> None:
    """After a step: forget prompts encoded by a text encoder that trains, then the hooks, progress and the log."""
    config = state.config
    if config.train_text_encoder:
        target.clear_prompt_cache()
    for hook in hooks:
        hook.on_step_end(state, logs)
    if progress is not None:
        progress(state.step, config.steps, logs)
    if config.log_every and state.step % config.log_every == 0:
        logger.info("step %d/%d loss %.4f", state.step, config.steps, running or float("nan"))


def _checkpoint_due(state: TrainState) -> bool:
    """At the end of the run, and every ``config.checkpoint_every`` steps."""
    config = state.config
    at_end = state.step >= config.steps
    return bool(at_end or (config.checkpoint_every and state.step % config.checkpoint_every == 0))


def _leave_training(target, chosen: list[torch.nn.Parameter]) -> None:
    """Every module back in eval mode, the trained parameters frozen again, cached prompts forgotten."""
    target.unet.eval()
    for encoder in target.text_encoders:
        encoder.eval()
    for p in chosen:
        p.requires_grad_(False)
    target.clear_prompt_cache()
