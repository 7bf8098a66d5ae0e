"""Batched, seeded sampling through the model family's own diffusers pipeline, recording the guidance norm at
every step at no extra denoiser cost.

Classifier-free guidance already evaluates the denoiser on the prompt and on the unconditional prompt at every step
(one call on a doubled batch, as diffusers does). A forward hook on the denoiser
(:func:`memaudit.families.sample`) keeps, for every image and step, the norm
``||eps(x_t, prompt) - eps(x_t, empty)||_2`` over the whole latent (in eps space whatever the model predicts): the
denoising-strength score of Wen et al. comes free with every generation, and the images are plain diffusers' for
the same seeds. A guidance-distilled model (Flux dev) makes no unconditional prediction: there the score costs one
extra denoiser call per image at each step of ``score_window`` (default: the first step only), NaN elsewhere.
A model whose first prediction (first step of a sampler's first batch: one device sync) holds NaN or inf is named
in a one-line :class:`~memaudit.core.errors.TargetError` before sampling goes on.

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

from memaudit.core.errors import ConfigError
from memaudit.detectors import Probe, get_detector
from memaudit.families import Conditioning, sample
from memaudit.families.base import nonfinite_prediction_error

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
    detectors: dict | None = None  # detector name -> [B] scores (memaudit.detectors), when any were chosen


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
                 embedding_hook: Callable[[Conditioning, torch.Tensor, torch.Tensor], Conditioning] | None = None,
                 prompt_transform: Callable[[str, int], str] | None = None,
                 score_window: tuple[int, int | None] = (0, 1), detectors: Sequence[str] = ()):
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
        #: the steps [start, stop) at which a model without an unconditional prediction (Flux dev) pays one extra
        #: denoiser call per image for the score: default the first step, the score that detects best
        self.score_window = score_window
        #: the memorization detectors read during the pass (:mod:`memaudit.detectors`), by name
        self.detectors = [get_detector(name) for name in detectors]
        #: denoiser evaluations the detectors made beyond the pass, one per image and evaluation
        self.detector_calls = 0
        self._unsupported: set[str] = set()  # detectors warned about: they do not read this family
        self.unet_time_s = 0.0
        #: denoiser evaluations made only for the score, one per image and scored step
        self.extra_calls = 0
        #: whether a batch's first prediction was found finite (the check costs one sync, so it is made once)
        self.checked_finite = False

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """The initial latents of images with these seeds, as the family's pipeline takes them."""
        target = self.target
        return target.family.initial_latents(target.pipe, seeds, target.resolution)

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        cond = self.conditioner(prompts) if self.conditioner else self.target.encode_prompts(prompts)
        return cond if isinstance(cond, Conditioning) else Conditioning({"prompt_embeds": cond})

    @torch.no_grad()
    def sample_batch(self, prompts: Sequence[str], seeds: Sequence[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Images ``[B, C, H, W]`` in [0, 1], guidance norms ``[B, steps]``, the timesteps and the chosen detectors'
        ``[B]`` scores by name, for one batch."""
        target, n = self.target, len(prompts)
        family, pipe = target.family, target.pipe
        if family.black_box:  # images only: no denoiser to read, so no norms (NaN)
            images = family.generate(pipe, prompts, seeds, steps=self.steps, guidance=self.guidance,
                                     resolution=target.resolution)
            nan = torch.full((n,), float("nan"))
            return (images, torch.full((n, self.steps), float("nan")), torch.full((self.steps,), float("nan")),
                    {d.name: nan for d in self.detectors})
        cond = self._conditioning(list(prompts)).to(target.device)
        latents = self.initial_latents(seeds)
        x0 = t0 = None
        if self.embedding_hook is not None:
            x0, t0 = family.first_step(pipe, latents, self.steps, target.resolution)
            cond = self.embedding_hook(cond, x0.to(target.device), t0)
        detectors, uncond = self._detectors(prompts), target.unconditional(n)
        if any(d.extra_calls for d in detectors):
            if x0 is None:
                x0, t0 = family.first_step(pipe, latents, self.steps, target.resolution)
            probe = Probe(x=x0.to(target.device), t=torch.as_tensor(t0), cond=cond, uncond=uncond,
                          schedule=family.sampling_timesteps(pipe, latents, self.steps), family=family, pipe=pipe,
                          score=lambda x, t, c: target.predict_score(x, t, c, guidance=self.guidance))
            for d in detectors:
                if d.extra_calls:
                    d.start(probe)
                    self.detector_calls += d.extra_calls * n
        run = sample(family, pipe, cond, uncond, seeds, steps=self.steps, guidance=self.guidance,
                     resolution=target.resolution, latents=latents, score_steps=self.score_step,
                     check_finite=not self.checked_finite, model=self.model_name(), detectors=detectors,
                     attention=self._attention(detectors))
        self.checked_finite = True
        self.extra_calls += run.extra_calls
        return run.images, run.norms, run.timesteps, run.detectors

    def _detectors(self, prompts: Sequence[str]) -> list:
        """The chosen detectors' instances for one batch: with the prompts' token counts and, on a family they read,
        their attention layers (on another, such as SD3's joint attention for an attention detector, they score
        NaN, logged once; the results say it does not read the family)."""
        if not self.detectors:
            return []
        target, n = self.target, len(prompts)
        family, denoiser = target.family, target.denoiser
        tokens = None
        if any(cls.attention_steps for cls in self.detectors):
            tokens = target.tokenize(list(prompts))["attention_mask"].sum(1)
        out = []
        for cls in self.detectors:
            layers = []
            if cls.families is None or family.name in cls.families:
                layers = cls.attention_layers(family, denoiser)
            elif cls.name not in self._unsupported:
                self._unsupported.add(cls.name)
                logger.info("detector %s does not read %s (it reads %s): its scores are NaN", cls.name,
                               family.title, ", ".join(cls.families))
            out.append(cls(n, tokens=tokens, layers=layers))
        return out

    def _attention(self, detectors: list) -> dict:
        """Cross-attention layer -> the steps some detector reads it at."""
        wanted: dict[str, set[int]] = {}
        last = self.steps - 1
        for d in detectors:
            steps = {0 if which == "first" else last for which in d.attention_steps}
            for name in d.layers:
                wanted.setdefault(name, set()).update(steps)
        return {name: steps.__contains__ for name, steps in wanted.items()}

    def model_name(self) -> str:
        """The audited model as messages name it: its folder, and its LoRA adapters if any."""
        path, loras = getattr(self.target, "path", ""), getattr(self.target, "loras", None) or []
        name = f"the model at {path}" if path else "the model"
        loras = [str(a["path"]) for a in loras]
        return name + (f" with LoRA {', '.join(loras)}" if loras else "")

    def score_step(self, step: int) -> bool:
        """Whether a model without an unconditional prediction pays an extra denoiser call at ``step``."""
        start, stop = self.score_window
        return start <= step and (stop is None or step < stop)

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
        if target.family.black_box:
            raise ConfigError(f"{target.family.title}: memaudit cannot read its denoiser, so it has no guidance norms.")
        out = []
        for chunk, seeds, used in self._chunks(prompts, generations):
            x, t = target.family.first_step(target.pipe, self.initial_latents(seeds), self.steps, target.resolution)
            x = x.to(target.device)
            tt = torch.as_tensor(t).reshape(1).expand(len(chunk)).to(target.device)
            eps_c = target.predict_score(x, tt, self._conditioning(used), guidance=self.guidance)
            eps_u = target.predict_score(x, tt, target.unconditional(len(chunk)), guidance=self.guidance)
            out.append((eps_c - eps_u).flatten(1).norm(dim=1).float().cpu())
            if not self.checked_finite:  # the norms are on the CPU already: no extra sync
                if not bool(torch.isfinite(out[-1]).all()):
                    bad = eps_c if not bool(torch.isfinite(eps_c).all()) else eps_u
                    raise nonfinite_prediction_error(self.model_name(), target.dtype,
                                                     nan=bool(torch.isnan(bad).any()))
                self.checked_finite = True
        return torch.cat(out)

    def run(self, prompts: Sequence[str], generations: int) -> Iterator[SampleBatch]:
        """Yield batches covering ``generations`` images of every prompt, prompt-major."""
        total, done = len(prompts) * generations, 0
        for chunk, seeds, used in self._chunks(prompts, generations):
            t0 = time.perf_counter()
            images, norms, timesteps, scores = self.sample_batch(used, seeds)
            self.unet_time_s += time.perf_counter() - t0
            done += len(chunk)
            if self.progress is not None:
                self.progress(done, total)
            yield SampleBatch(prompt_index=torch.tensor([i for i, _ in chunk]), generation=torch.tensor([j for _, j in chunk]),
                              seeds=seeds, images=images, guidance_norms=norms, timesteps=timesteps,
                              prompts=used if self.prompt_transform is not None else None,
                              detectors=scores if self.detectors else None)
