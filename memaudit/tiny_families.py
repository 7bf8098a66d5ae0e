"""Tiny text-to-image pipelines of every model family, built in code with random weights, for tests and benchmarks.

This module is the entry point: each family builds its own tiny pipeline in its file (``tiny(...)`` in
:mod:`memaudit.families.sdxl`, :mod:`~memaudit.families.sd3`, :mod:`~memaudit.families.flux`,
:mod:`~memaudit.families.pixart`; Stable Diffusion's is :func:`memaudit.testing.tiny_pipeline`) from the parts they
share in :mod:`memaudit.families.tiny`, and the functions here dispatch to them.

Each builder returns an in-memory diffusers pipeline of the real class, so ``pipe(...)`` runs end to end and
``pipe.save_pretrained(folder, safe_serialization=True)`` followed by ``DiffusionPipeline.from_pretrained(folder)``
round-trips with no network. Weights are random but deterministic: ``torch.manual_seed(seed)`` is called before
each component is built (default seed 0); everything is float32. The sizes follow the ``get_dummy_components`` of
diffusers' own pipeline tests, with tokenizers built offline instead of downloaded:

- :func:`tiny_sd` -- ``StableDiffusionPipeline`` with the Stable Diffusion 1.x layout (UNet2DConditionModel, CLIP
  text encoder, AutoencoderKL, DDIM); ``prediction_type="v_prediction"`` gives the SD 2.x case.
- :func:`tiny_sdxl` -- ``StableDiffusionXLPipeline``: two CLIP text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``, whose concatenated penultimate hidden states are the cross attention context and
  whose projection is the pooled embedding), a UNet with ``addition_embed_type="text_time"``, SDXL's
  EulerDiscreteScheduler and VAE scaling factor, ``force_zeros_for_empty_prompt=True``, no image encoder.
- :func:`tiny_sd3` -- ``StableDiffusion3Pipeline``: SD3Transformer2DModel, CLIP-L and CLIP-G (both with projection),
  a T5 encoder, FlowMatchEulerDiscreteScheduler (shift 3) and a 16-channel AutoencoderKL with SD3's shift and
  scaling factors and no quant convs.
- :func:`tiny_flux` -- ``FluxPipeline``: FluxTransformer2DModel (guidance embedding for ``"dev"``, none for
  ``"schnell"``), a CLIP text model (pooled), a T5 encoder, each variant's FlowMatchEulerDiscreteScheduler
  configuration and a 16-channel AutoencoderKL with Flux's shift and scaling factors.
- :func:`tiny_pixart_sigma` -- ``PixArtSigmaPipeline``: PixArtTransformer2DModel with learned sigma (twice as many
  output as input channels), a T5 encoder, DPMSolverMultistepScheduler (as in diffusers' conversion script) and
  an AutoencoderKL with the SDXL VAE's scaling factor (PixArt-Sigma uses the SDXL VAE).
- :func:`tiny_family` -- dispatch over :data:`FAMILY_NAMES`.

Every pipeline makes :data:`RESOLUTION` (32) pixel images from 16x16 latents (the VAEs have two blocks, a scale
factor of 2). CLIP tokenizers are the real, full CLIP BPE (49,408 tokens, :func:`memaudit.tokenizers.
build_clip_tokenizer`) shortened to :data:`CLIP_MAX_LENGTH` tokens; the T5 tokenizer is a small Unigram
model estimated in code on a built-in English corpus (:func:`t5_tokenizer`).

What a caller must pass (:func:`call_kwargs` returns it for a family name or a pipeline):

- ``height``/``width``: not needed for "sd", "sd2", "sdxl", "sd3" and "pixart-sigma" (their default is
  :data:`RESOLUTION`, derived from the UNet's or transformer's ``sample_size``), but **required for Flux**:
  ``FluxPipeline`` always defaults to ``128 * vae_scale_factor`` pixels (256 px here, 4,096 image tokens).
  :func:`default_resolution` gives the intended size of any of these pipelines.
- ``max_sequence_length``: not for SD3 and Flux, which memaudit samples at their pipelines' defaults (256 and 512
  T5 tokens) as a plain call does (the T5 tokenizer pads to any length; T5 has relative positions), but
  ``max_sequence_length=T5_MAX_LENGTH`` (32, the T5 tokenizer's ``model_max_length``) for PixArt-Sigma, whose
  family encodes at most the tokenizer's length (:meth:`memaudit.families.pixart.PixArt.max_sequence_length`).
- ``use_resolution_binning=False`` for PixArt-Sigma: binning (on by default) only knows transformer sample sizes
  of 32 to 256 latents (256 to 2048 px) and raises ``ValueError: Invalid sample size`` for the tiny model. Also
  ``clean_caption=False``: the default ``True`` needs beautifulsoup4 and ftfy (it warns and skips cleaning without
  them, so the output would depend on what is installed).
"""

from __future__ import annotations

from memaudit.families import flux, pixart, sd3, sdxl
from memaudit.families.tiny import (
    CLIP_MAX_LENGTH,
    RESOLUTION,
    T5_MAX_LENGTH,
    clip_tokenizer,
    t5_corpus,
    t5_tokenizer,
    t5_vocab,
)
from memaudit.testing import tiny_pipeline

__all__ = ["CLIP_MAX_LENGTH", "FAMILY_NAMES", "RESOLUTION", "T5_MAX_LENGTH", "call_kwargs", "clip_tokenizer",
           "default_resolution", "t5_corpus", "t5_tokenizer", "t5_vocab", "tiny_family", "tiny_flux",
           "tiny_pixart_sigma", "tiny_sd", "tiny_sd3", "tiny_sdxl"]

FAMILY_NAMES = ("sd", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell", "pixart-sigma")


# --------------------------------------------------------------------------------------------------- families

def tiny_sd(prediction_type: str = "epsilon", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (SD 1.x layout, DDIM, full CLIP tokenizer, :data:`RESOLUTION` px).

    ``prediction_type="v_prediction"`` is the SD 2.x case. Built by :func:`memaudit.testing.tiny_pipeline`.
    """
    return tiny_pipeline(prediction_type=prediction_type, resolution=RESOLUTION, seed=seed,
                         max_length=CLIP_MAX_LENGTH)


def tiny_sdxl(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline``: :func:`memaudit.families.sdxl.tiny`."""
    return sdxl.tiny(seed=seed)


def tiny_sd3(seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline``: :func:`memaudit.families.sd3.tiny`."""
    return sd3.tiny(seed=seed)


def tiny_flux(variant: str = "dev", seed: int = 0):
    """A tiny ``FluxPipeline`` of the ``"dev"`` or ``"schnell"`` variant: :func:`memaudit.families.flux.tiny`. Pass
    ``height``/``width`` (:data:`RESOLUTION`) when calling it: Flux's own default is 256 px here."""
    return flux.tiny(variant=variant, seed=seed)


def tiny_pixart_sigma(seed: int = 0):
    """A tiny ``PixArtSigmaPipeline``: :func:`memaudit.families.pixart.tiny`. Call it with
    ``use_resolution_binning=False``."""
    return pixart.tiny(seed=seed)


_BUILDERS = {
    "sd": lambda **kw: tiny_sd(prediction_type="epsilon", **kw),
    "sd2": lambda **kw: tiny_sd(prediction_type="v_prediction", **kw),
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "flux-dev": lambda **kw: tiny_flux(variant="dev", **kw),
    "flux-schnell": lambda **kw: tiny_flux(variant="schnell", **kw),
    "pixart-sigma": tiny_pixart_sigma,
}


def tiny_family(name: str, **kw):
    """The tiny pipeline of family ``name`` (one of :data:`FAMILY_NAMES`); ``kw`` goes to its builder (``seed``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILY_NAMES)}")
    return _BUILDERS[name](**kw)


# --------------------------------------------------------------------------------------------------- calling them

def default_resolution(pipe) -> int:
    """The pixel size a tiny pipeline is meant to generate (height = width).

    For UNet pipelines and SD3/PixArt-Sigma this is the pipeline's own default (``sample_size`` times the VAE scale
    factor); Flux's own default ignores the model (128 latents), so for it the VAE's ``sample_size`` is used, which
    the tiny builders set to :data:`RESOLUTION`.
    """
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if type(pipe).__name__.startswith("Flux"):
        return int(pipe.vae.config.sample_size)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return int(denoiser.config.sample_size) * scale


def call_kwargs(pipe_or_name) -> dict:
    """Keyword arguments to pass when calling a tiny pipeline (given as a pipeline or a family name) to get the images
    memaudit samples: ``height`` and ``width`` (:func:`default_resolution`), and for PixArt ``max_sequence_length``
    (:data:`T5_MAX_LENGTH`), ``use_resolution_binning=False`` and ``clean_caption=False``. SD3 and Flux need no
    ``max_sequence_length``: memaudit uses their pipelines' defaults."""
    if isinstance(pipe_or_name, str):
        if pipe_or_name not in _BUILDERS:
            raise ValueError(f"unknown model family {pipe_or_name!r}; choose one of {', '.join(FAMILY_NAMES)}")
        kind = {"sd": "StableDiffusion", "sd2": "StableDiffusion", "sdxl": "StableDiffusionXL", "sd3": "StableDiffusion3",
                "flux-dev": "Flux", "flux-schnell": "Flux", "pixart-sigma": "PixArtSigma"}[pipe_or_name]
        size = RESOLUTION
    else:
        kind = type(pipe_or_name).__name__.removesuffix("Pipeline")
        size = default_resolution(pipe_or_name)
    kw = {"height": size, "width": size}
    if kind in ("PixArtSigma", "PixArtAlpha"):
        kw["max_sequence_length"] = T5_MAX_LENGTH
        kw["use_resolution_binning"] = False
        kw["clean_caption"] = False  # cleaning needs bs4 and ftfy; without them the pipeline warns and skips it
    return kw
