"""Build a Stable Diffusion pipeline of any size from scratch, in code, with no download.

Used for the tiny models of the tests and for the bundled demo models. The layout is that of Stable Diffusion
1.x (UNet2DConditionModel with cross attention, AutoencoderKL, CLIP text encoder and tokenizer, a DDIM or
DPM-Solver scheduler with SD's noise schedule), only smaller.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from memaudit.tokenizers import build_clip_tokenizer

SCHEDULERS = ("ddim", "dpm", "ddpm", "pndm", "euler")


@dataclass
class ModelSpec:
    """Sizes of a from-scratch SD-style pipeline."""

    image_channels: int = 3
    resolution: int = 32
    vae_channels: tuple[int, ...] = (8, 16)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 4
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (8, 16)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 4
    attention_head_dim: int = 4
    cross_attention_dim: int = 8
    text_hidden: int = 8
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 16
    max_length: int = 77
    prediction_type: str = "epsilon"
    scheduler: str = "ddim"

    def to_dict(self) -> dict:
        return asdict(self)


def make_scheduler(kind: str = "ddim", prediction_type: str = "epsilon"):
    """A scheduler with Stable Diffusion's noise schedule (scaled linear, 0.00085 to 0.012, 1000 steps).

    ``clip_sample`` is off: clipping predicted latents to [-1, 1] ruins latent-space samples.
    """
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  prediction_type=prediction_type)
    if kind == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "dpm":
        return diffusers.DPMSolverMultistepScheduler(**common, steps_offset=1)
    if kind == "ddpm":
        return diffusers.DDPMScheduler(**common, clip_sample=False, steps_offset=1)
    if kind == "pndm":
        return diffusers.PNDMScheduler(**common, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    if kind == "euler":
        return diffusers.EulerDiscreteScheduler(**common, steps_offset=1)
    raise ValueError(f"scheduler {kind!r} is not one of {', '.join(SCHEDULERS)}")


def build_pipeline(spec: ModelSpec | None = None, tokenizer=None, words: Iterable[str] | None = None, seed: int = 0):
    """A randomly initialised ``StableDiffusionPipeline`` of the given sizes (deterministic for a seed).

    ``tokenizer`` defaults to the full CLIP tokenizer, or its restriction to ``words`` when given.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    spec = spec or ModelSpec()
    if tokenizer is None:
        tokenizer = build_clip_tokenizer(words, model_max_length=spec.max_length)
    n_levels = len(spec.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=spec.resolution // 2 ** (len(spec.vae_channels) - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=tuple(spec.unet_channels),
        layers_per_block=spec.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n_levels,
        up_block_types=("CrossAttnUpBlock2D",) * n_levels,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.unet_norm_groups,
    )
    torch.manual_seed(seed + 1)
    n_vae = len(spec.vae_channels)
    vae = AutoencoderKL(
        in_channels=spec.image_channels,
        out_channels=spec.image_channels,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.resolution,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_intermediate,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(spec.scheduler, spec.prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
