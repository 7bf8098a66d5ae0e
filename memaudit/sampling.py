"""Batched, seeded sampling that records the guidance norm at every step, at no extra UNet cost.

Classifier-free guidance already evaluates the UNet on the prompt and on the empty prompt at every step (one call
on a doubled batch, as diffusers does). The sampler keeps, for every image and step, the norm
``||eps(x_t, prompt) - eps(x_t, empty)||_2`` over the whole latent (in eps space whatever the model predicts): the
denoising-strength score of Wen et al. comes free with every generation.

Image ``j`` of prompt ``i`` starts from latents drawn on the CPU from a generator seeded with
:func:`image_seed` ``(seed, i, j)``, so an image is the same on CPU and GPU and whatever the batch it falls in
(for deterministic schedulers such as DDIM and DPM-Solver). Batches are streamed: memory grows with the batch size,
not with the number of images.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memaudit.errors import ConfigError
from memaudit.target import output_to_eps

logger = logging.getLogger(__name__)

IMAGE_SEED_FORMULA = "numpy.random.SeedSequence([seed, prompt_index, generation]).generate_state(1, uint64)[0] mod 2**63"


def image_seed(seed: int, prompt_index: int, generation: int) -> int:
    """The seed of one image: independent streams for every (seed, prompt, generation)."""
    state = np.random.SeedSequence([int(seed), int(prompt_index), int(generation)]).generate_state(1, np.uint64)[0]
    return int(state) % (2**63)


@dataclass
class SampleBatch:
    """One batch of generations: images in [0, 1] (float32, CPU) and per-step guidance norms."""

    prompt_index: torch.Tensor  # [B] index into the prompt list
    generation: torch.Tensor  # [B] generation number within its prompt
    seeds: list[int]
    images: torch.Tensor  # [B, C, H, W]
    guidance_norms: torch.Tensor  # [B, steps], ||eps_c - eps_u||_2 per image and step
    timesteps: torch.Tensor  # [steps]
    prompts: list[str] | None = None  # the prompts actually used, when a prompt transform changed them


class Sampler:
    """Generate ``generations`` images for each prompt, in prompt-major order, in batches.

    ``conditioner(prompts) -> embeddings`` replaces the target's prompt encoding; by default the target's cached
    :meth:`~memaudit.target.Target.encode_prompts`. ``prompt_transform(prompt, image_seed) -> prompt`` changes the
    prompt of each image before encoding, seeded by the image's own seed (inference-time random word addition plugs
    in here, so every generation gets its own perturbation, reproducibly).
    """

    def __init__(self, target, steps: int = 25, guidance: float = 7.5, batch_size: int = 16, seed: int = 0,
                 conditioner: Callable[[list[str]], torch.Tensor] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 embedding_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 prompt_transform: Callable[[str, int], str] | None = None):
        if steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {steps}).")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1 (got {batch_size}).")
        self.target, self.steps, self.guidance, self.batch_size, self.seed = target, steps, guidance, batch_size, seed
        self.conditioner = conditioner
        # embedding_hook(cond, x_T, t_first) -> cond: changes a batch's prompt embeddings once, before the first
        # step, knowing its initial latents (inference-time threshold mitigation plugs in here)
        self.embedding_hook = embedding_hook
        self.prompt_transform = prompt_transform
        self.progress = progress
        self.unet_time_s = 0.0

    def _scheduler(self):
        sched = type(self.target.scheduler).from_config(self.target.scheduler.config)
        sched.set_timesteps(self.steps, device=self.target.device)
        return sched

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        shape = self.target.latent_shape
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def sample_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``[B, C, H, W]`` in [0, 1], guidance norms ``[B, steps]`` and the timesteps, for one batch."""
        target, n = self.target, len(prompts)
        sched = self._scheduler()
        cond = self.conditioner(list(prompts)) if self.conditioner else target.encode_prompts(list(prompts))
        emb = torch.cat([target.empty_embedding(n), cond.to(target.device)]).to(target.dtype)
        x = (self.initial_latents(seeds) * sched.init_noise_sigma).to(target.device)
        if self.embedding_hook is not None:
            x0 = sched.scale_model_input(x, sched.timesteps[0])
            emb = torch.cat([emb[:n], self.embedding_hook(emb[n:], x0, sched.timesteps[0]).to(emb.dtype)])
        step_gen = torch.Generator().manual_seed(int(seeds[0]))  # used only by stochastic schedulers
        norms = torch.empty(n, len(sched.timesteps), device=target.device)  # copied to the CPU once, after the loop
        # alpha_bar of every step, computed once on the CPU: no device synchronisation inside the loop
        alpha_bars = target.alphas_cumprod[sched.timesteps.detach().cpu().long()].to(target.device)
        for i, t in enumerate(sched.timesteps):
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            out = target.unet(x_in.to(target.dtype), t, encoder_hidden_states=emb).sample.float()
            out_u, out_c = out.chunk(2)
            if target.prediction_type == "epsilon":
                diff = out_c - out_u
            else:
                eps = output_to_eps(out, x_in.float(), alpha_bars[i].expand(2 * n), target.prediction_type)
                diff = eps[n:] - eps[:n]
            norms[:, i] = diff.flatten(1).norm(dim=1)
            guided = out_u + self.guidance * (out_c - out_u)
            x = _step(sched, guided, t, x, step_gen)
        images = (target.decode_latents(x) + 1) / 2
        return images.cpu(), norms.cpu(), sched.timesteps.cpu()

    def _chunks(self, prompts: Sequence[str], generations: int) -> Iterator[tuple[list, list[int], list[str]]]:
        """The batches of a run: (``(prompt, generation)`` pairs, image seeds, the prompts after the transform)."""
        if generations < 1:
            raise ConfigError(f"generations must be at least 1 (got {generations}).")
        if not prompts:
            raise ConfigError("no prompts to sample.")
        # (prompt, generation) pairs are produced lazily: a run of any size starts in memory bounded by the batch
        jobs = ((i, j) for i in range(len(prompts)) for j in range(generations))
        while chunk := list(itertools.islice(jobs, self.batch_size)):
            seeds = [image_seed(self.seed, i, j) for i, j in chunk]
            used = [prompts[i] for i, _ in chunk]
            if self.prompt_transform is not None:
                used = [self.prompt_transform(p, s) for p, s in zip(used, seeds)]
            yield chunk, seeds, used

    @torch.no_grad()
    def first_step_norms(self, prompts: Sequence[str], generations: int) -> torch.Tensor:
        """``[len(prompts) * generations]`` guidance norms at the first sampling step only (prompt-major), from the
        same initial latents and prompts as :meth:`run` and without the embedding hook: one UNet call per image."""
        target = self.target
        out = []
        for chunk, seeds, used in self._chunks(prompts, generations):
            sched = self._scheduler()
            t = sched.timesteps[0]
            x = sched.scale_model_input((self.initial_latents(seeds) * sched.init_noise_sigma).to(target.device), t)
            cond = self.conditioner(used) if self.conditioner else target.encode_prompts(used)
            tt = t.reshape(1).expand(len(chunk)).to(target.device)
            eps_c = target.predict_eps(x, tt, cond.to(target.device))
            eps_u = target.predict_eps(x, tt, target.empty_embedding(len(chunk)))
            out.append((eps_c - eps_u).flatten(1).norm(dim=1).float().cpu())
        return torch.cat(out)

    def run(self, prompts: Sequence[str], generations: int) -> Iterator[SampleBatch]:
        """Yield batches covering ``generations`` images of every prompt, prompt-major."""
        total, done = len(prompts) * generations, 0
        for chunk, seeds, used in self._chunks(prompts, generations):
            t0 = time.perf_counter()
            images, norms, timesteps = self.sample_batch(used, seeds)
            self.unet_time_s += time.perf_counter() - t0
            done += len(chunk)
            if self.progress is not None:
                self.progress(done, total)
            yield SampleBatch(prompt_index=torch.tensor([i for i, _ in chunk]), generation=torch.tensor([j for _, j in chunk]),
                              seeds=seeds, images=images, guidance_norms=norms, timesteps=timesteps,
                              prompts=used if self.prompt_transform is not None else None)

def _step(sched, model_output: torch.Tensor, t, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return sched.step(model_output.to(x.dtype), t, x, **_step_kwargs(type(sched), generator)).prev_sample


def _step_kwargs(scheduler_class: type, generator: torch.Generator) -> dict:
    """Stochastic schedulers take a generator; whether one does is looked up once per class."""
    takes = _TAKES_GENERATOR.get(scheduler_class)
    if takes is None:
        import inspect

        takes = _TAKES_GENERATOR[scheduler_class] = "generator" in inspect.signature(scheduler_class.step).parameters
    return {"generator": generator} if takes else {}


_TAKES_GENERATOR: dict[type, bool] = {}
