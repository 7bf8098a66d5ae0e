"""Denoising strength (Wen et al., ICLR 2024): memorized prompts pull the noise prediction hard.

For generation ``j`` and sampling step ``i``, ``d_ij = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2`` over the
whole latent, not scaled by the guidance weight. A prompt's score is the mean over its generations and over a window
of steps; memorized prompts score high. The :class:`~memaudit.sampling.Sampler` records ``d_ij`` for free during
generation; :func:`prompt_scores` turns them into per-prompt scores.

Also here: the *training-time* variant (noise training latents at random ``t`` and take the same norm: a cheap
reward that needs no sampling), and token attribution (which prompt tokens drive the score). Thresholds are not
hard-coded: :func:`memaudit.metrics.detection.calibrate_threshold` sets one at a chosen false-positive rate on
prompts known not to be memorized.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memaudit.core.errors import ConfigError
from memaudit.families import Conditioning


def step_window(n_steps: int, window: tuple[int, int | None] = (0, None)) -> slice:
    """The steps ``[start, stop)`` a score averages over (``stop=None``: to the last step); validated."""
    start, stop = window
    stop = n_steps if stop is None else stop
    if not (0 <= start < stop <= n_steps):
        raise ConfigError(f"denoising step window {window} is not within the {n_steps} sampling steps; "
                          "use start >= 0 and start < stop <= steps.")
    return slice(start, stop)


def image_scores(norms: torch.Tensor | np.ndarray, window: tuple[int, int | None] = (0, None)) -> np.ndarray:
    """Per-image denoising strength ``[N_images]`` (float64): the mean of each image's norms ``[N_images, steps]``
    over the step window, steps without a norm (NaN: not scored, as Flux's steps after the first) left out; NaN
    for an image with no scored step in the window (a black-box model's)."""
    norms = torch.as_tensor(np.asarray(norms), dtype=torch.float64)
    return norms[:, step_window(norms.shape[1], window)].nanmean(1).numpy()


def prompt_scores(norms: torch.Tensor, prompt_index: torch.Tensor, n_prompts: int,
                  window: tuple[int, int | None] = (0, None), generation: torch.Tensor | None = None,
                  max_generations: int | None = None) -> np.ndarray:
    """Per-prompt denoising strength: mean over the step window (:func:`image_scores`), then over (the first
    ``max_generations``) generations of each prompt. ``norms`` is ``[N_images, steps]``; prompts without images get
    NaN."""
    per_image = torch.from_numpy(image_scores(norms, window))
    idx = torch.as_tensor(prompt_index).long()
    keep = torch.ones(len(idx), dtype=torch.bool)
    if max_generations is not None and generation is not None:
        keep = torch.as_tensor(generation) < max_generations
    sums = torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, idx[keep], per_image[keep])
    counts = torch.zeros(n_prompts, dtype=torch.float64).index_add_(0, idx[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).numpy()


@torch.no_grad()
def training_strength(target, latents: torch.Tensor, captions: Sequence[str], timesteps: torch.Tensor | None = None,
                      generator: torch.Generator | None = None, batch_size: int = 32) -> torch.Tensor:
    """Training-time denoising strength of clean scaled latents ``[N, c, h, w]`` noised at ``timesteps``
    (default: uniform random, drawn from ``generator``): ``||eps(x_t, caption) - eps(x_t, empty)||`` per sample.
    One UNet call on a doubled batch per chunk."""
    n = len(latents)
    if len(captions) != n:
        raise ConfigError(f"{len(captions)} captions for {n} latents.")
    generator = generator or torch.Generator().manual_seed(0)
    if timesteps is None:
        timesteps = target.sample_timesteps(n, generator)
    noise = torch.randn(latents.shape, generator=generator)
    out = torch.empty(n)
    for k in range(0, n, batch_size):
        s = slice(k, k + batch_size)
        out[s] = noised_strength(target, latents[s].cpu(), noise[s], timesteps[s].cpu(), list(captions[s]))
    return out


def noised_strength(target, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, captions: list[str],
                    cond=None) -> torch.Tensor:
    """``||eps(x_t, c) - eps(x_t, empty)||`` for clean latents ``x0`` noised with ``noise`` at ``t`` (CPU tensors).

    ``cond`` (optional) gives the captions' conditioning directly. No gradient is taken unless the caller enables
    it.
    """
    b = len(x0)
    x_t = target.add_noise(x0, noise, t).to(target.device)
    cond = target.encode_prompts(captions) if cond is None else cond
    emb = Conditioning.cat([target.unconditional(b), cond.to(target.device)])
    tt = torch.cat([t, t]).to(target.device)
    score = target.predict_score(torch.cat([x_t, x_t]), tt, emb)
    return (score[b:] - score[:b]).flatten(1).norm(dim=1).cpu()


def token_attribution(target, prompt: str, seed: int = 0, timestep: int | None = None) -> list[tuple[str, float]]:
    """How much each prompt token drives the denoising strength (Wen et al.'s token-level attribution).

    The score at the first sampling step (pure noise, ``t`` = the last training timestep by default) is
    differentiated with respect to every token embedding; each real token's share of the gradient norms is
    returned (shares sum to 1), in prompt order, as the tokenizer splits it (word-start marks removed).

    The tokens are the first text encoder's (:meth:`memaudit.target.Target.tokenize`): for SDXL, SD3 and Flux, which
    also read the prompt with a second CLIP or a T5 encoder, the shares say how the score depends on the first
    encoder's token embeddings only.
    """
    tok = target.tokenize([prompt])
    ids = tok["input_ids"][0]
    embedding = target.text_encoder.get_input_embeddings()
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        if output.requires_grad:
            output.retain_grad()
            captured["emb"] = output
        return output

    target.unconditional(1)  # cache the empty prompt before hooking the embedding layer
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *target.latent_shape), generator=gen)
    t = target.pure_noise_timestep() if timestep is None else torch.tensor([timestep])
    # every module holding the input embedding's weight: T5's encoder calls its own embed_tokens, which shares the
    # weight of get_input_embeddings() (``shared``) but is another module
    tied = [m for m in target.text_encoder.modules() if getattr(m, "weight", None) is embedding.weight]
    handles = [m.register_forward_hook(hook) for m in tied]
    was = embedding.weight.requires_grad
    try:
        with torch.enable_grad():
            embedding.weight.requires_grad_(True)
            cond = target.embed([prompt])
            # x_t is the forward process at t applied to a zero image: pure noise, as at the first sampling step
            score = noised_strength(target, torch.zeros_like(noise), noise, t, [prompt], cond=cond)
            score.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        embedding.weight.requires_grad_(was)
        embedding.weight.grad = None
    grads = captured["emb"].grad[0].norm(dim=-1).detach().cpu()
    special = {target.tokenizer.bos_token_id, target.tokenizer.eos_token_id, target.tokenizer.pad_token_id}
    positions = [i for i, tid in enumerate(ids.tolist()) if tid not in special]
    total = float(grads[positions].sum()) or 1.0
    tokens = target.tokenizer.convert_ids_to_tokens([ids[i].item() for i in positions])
    return [(tok_.replace("</w>", "").removeprefix("\u2581"), float(grads[i]) / total)
            for tok_, i in zip(tokens, positions)]
