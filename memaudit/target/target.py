"""The :class:`Target`: a loaded text-to-image pipeline of a known family, with what the audit needs of it in one
place (its parts, cached prompt conditioning, noising, the noise prediction in eps space, latents <-> images)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memaudit.core.devices import resolve_device, resolve_dtype
from memaudit.core.errors import TargetError
from memaudit.core.io import atomic_directory
from memaudit.families import Conditioning, Family

__all__ = ["Target"]


@dataclass(eq=False)
class Target:
    """A loaded text-to-image pipeline of a known :mod:`family <memaudit.families>`: its parts, where they run,
    cached prompt conditioning, and the family's noise prediction in eps space."""

    pipe: Any
    family: Family
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    path: str = ""
    #: LoRA adapters applied to the base, in order: [{"path", "file", "sha256", "scale", "keys", "modules_named",
    #: "modules_matched", "partial"}, ...] (see :func:`apply_lora`)
    loras: list = field(default_factory=list)
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    # -- parts -----------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser(self.pipe)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self.pipe, self.family.denoiser_name, module)

    # the denoiser under its Stable Diffusion name, for code written before the other families
    unet = denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.family.text_encoder_names if getattr(self.pipe, n, None) is not None]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return getattr(self.pipe, self.family.text_encoder_names[0])

    @property
    def tokenizer(self):
        return getattr(self.pipe, self.family.tokenizer_names[0])

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Every torch module of the pipeline, by component name (denoiser first)."""
        names = self.family.module_names(self.pipe)
        return [(n, getattr(self.pipe, n)) for n in names if isinstance(getattr(self.pipe, n, None), torch.nn.Module)]

    # -- facts about the model -------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """``epsilon``, ``v_prediction`` or ``sample`` (DDPM-type families), or ``flow`` (flow matching)."""
        return self.family.prediction_type(self.pipe)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.pipe)

    @property
    def resolution(self) -> int:
        """Side of the images the model generates by default, in pixels."""
        return self.family.resolution(self.pipe)

    @property
    def image_channels(self) -> int:
        return self.family.image_channels(self.pipe)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.family.latent_shape(self.pipe, self.resolution)

    @property
    def scaling_factor(self) -> float:
        return self.family.latent_scaling(self.pipe)[0]

    @property
    def shift_factor(self) -> float:
        return self.family.latent_scaling(self.pipe)[1]

    @property
    def num_train_timesteps(self) -> int:
        return self.family.num_train_timesteps(self.pipe)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alpha_bar`` of every training timestep (DDPM-type families only)."""
        if self.family.flow:
            raise TargetError(f"{self.family.title} is a flow-matching model: it has no alphas_cumprod.")
        return self.family.alphas_cumprod(self.pipe)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` for timesteps ``t`` (a tensor), on the CPU in float32 (DDPM-type families only)."""
        if self.family.flow:
            raise TargetError(f"{self.family.title} is a flow-matching model: it has no alphas_cumprod.")
        return self.family.alpha_bar(self.pipe, torch.as_tensor(t).detach().cpu().reshape(-1)).cpu()

    # -- noise, in the family's terms ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps for ``n`` samples (scheduler units), drawn from ``generator``."""
        return self.family.sample_timesteps(self.pipe, n, generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean scaled latents ``x0`` noised with ``noise`` at timesteps ``t``."""
        return self.family.add_noise(self.pipe, x0, noise, t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output for ``add_noise(x0, noise, t)``."""
        return self.family.training_target(self.pipe, x0, noise, t)

    def pure_noise_timestep(self) -> torch.Tensor:
        return self.family.pure_noise_timestep(self.pipe)

    # -- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The first text encoder's ids and attention mask, as the family's encoding feeds them to it
        (:meth:`memaudit.families.base.Family.tokenize`)."""
        return {k: v.to(self.device) for k, v in self.family.tokenize(self.pipe, list(prompts)).items()}

    def embed(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts`` (with gradient when enabled; no caching)."""
        return self.family.encode(self.pipe, list(prompts), self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning of batch ``len(prompts)`` for inference; each distinct prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            encoders = self.text_encoders
            modes = [m.training for m in encoders]
            for m in encoders:
                m.eval()
            cond = self.embed(missing)
            for m, mode in zip(encoders, modes):
                m.train(mode)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = cond[i].detach()
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    @torch.no_grad()
    def unconditional(self, n: int = 1) -> Conditioning:
        """The unconditional conditioning the pipeline guides with (the empty prompt; SDXL: zeros), ``n`` times."""
        if "\0uncond" not in self._prompt_cache:
            self._prompt_cache["\0uncond"] = self.family.unconditional(self.pipe, self.device).detach()
        return self._prompt_cache["\0uncond"].repeat(n)

    empty_embedding = unconditional

    def clear_prompt_cache(self) -> None:
        """Forget cached conditioning (call after changing a text encoder)."""
        self._prompt_cache.clear()

    # -- noise prediction ------------------------------------------------------------------------------------
    def to_score(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A raw denoiser output in the family's score space (:meth:`Family.score_output`)."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.score_output(self.pipe, output, x_t, t)

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.to_eps(self.pipe, output, x_t, t)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                guidance: float | None = None) -> torch.Tensor:
        """The raw denoiser output (in the model's own prediction type) for unpacked latents ``x_t``; ``guidance``
        reaches denoisers that embed it (Flux dev; None: the family's default)."""
        cond = _as_conditioning(cond).to(self.device, self.dtype)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        kw = {"guidance": guidance} if guidance is not None and self.family.embedded_guidance else {}
        return self.family.denoise(self.pipe, x_t.to(self.dtype), t, cond, **kw)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                    guidance: float | None = None) -> torch.Tensor:
        """Noise prediction in epsilon space (float32), whatever the model predicts."""
        t = torch.as_tensor(t, device=x_t.device)
        return self.to_eps(self.denoise(x_t, t, cond, guidance), x_t, t)

    def predict_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                      guidance: float | None = None) -> torch.Tensor:
        """The prediction in the family's score space (:meth:`Family.score_output`: eps, or a flow's velocity):
        the denoising strength is the norm of its conditional minus unconditional difference."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.score_output(self.pipe, self.denoise(x_t, t, cond, guidance), x_t, t)

    # -- images <-> latents ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE posterior as latents: ``(mean - shift) * scaling`` and
        ``std * scaling``."""
        scale, shift = self.family.latent_scaling(self.pipe)
        means, stds = [], []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            means.append((dist.mean.float() - shift) * scale if shift else dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1], float32, from scaled latents."""
        scale, shift = self.family.latent_scaling(self.pipe)
        out = []
        for i in range(0, len(latents), batch_size):
            z = latents[i : i + batch_size].to(self.device, self.dtype) / scale
            if shift:
                z = z + shift
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out)

    @torch.no_grad()
    def round_trip(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images passed through the VAE (posterior mean): the best the decoder can do for them."""
        return self.decode_latents(self.encode_images(images, batch_size)[0], batch_size)

    # -- pipelines -------------------------------------------------------------------------------------------
    def pipeline(self):
        """The diffusers pipeline (its modules are this target's)."""
        return self.pipe

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a diffusers pipeline folder atomically (safetensors), the denoiser and VAE optionally cast to
        ``dtype`` (text encoders stay float32: transformers keeps a text encoder's saved dtype, and plain diffusers
        loads the rest in float32, so a half-precision text encoder would break ``from_pretrained(path)``)."""
        import copy

        pipe = self.pipe
        if dtype is not None and dtype != self.dtype:
            pipe = copy.deepcopy(pipe)
            self.family.denoiser(pipe).to(dtype=dtype)
            pipe.vae.to(dtype=dtype)
            for name in self.family.text_encoder_names:
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(dtype=torch.float32)
        with atomic_directory(path) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return Path(path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Target:
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        for _, m in self.modules():
            if next(m.parameters()).dtype == self.dtype:
                m.to(self.device)
            else:
                m.to(device=self.device, dtype=self.dtype)
        self._prompt_cache.clear()
        return self


def _as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning({"prompt_embeds": cond})
