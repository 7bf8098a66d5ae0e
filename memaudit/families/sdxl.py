"""Stable Diffusion XL (``StableDiffusionXLPipeline``).

Architecture: a ``UNet2DConditionModel`` with SDXL's added conditioning (``addition_embed_type="text_time"``),
two CLIP text encoders -- ``text_encoder`` (``CLIPTextModel``, CLIP-L) and ``text_encoder_2``
(``CLIPTextModelWithProjection``, OpenCLIP-G) -- whose penultimate hidden states, concatenated along the feature
axis, are the cross-attention context (``prompt_embeds``) and whose second encoder's projected output is the pooled
embedding (``pooled_prompt_embeds``), and an ``AutoencoderKL`` (scaling factor 0.13025, no shift, no packing).

Conventions:

- Conditioning: ``prompt_embeds`` ``[B, 77, 2048]`` and ``pooled_prompt_embeds`` ``[B, 1280]`` (the pipeline's own
  keyword arguments), from the pipeline's ``encode_prompt`` without guidance. The unconditional conditioning is the
  one the pipeline guides with when no negative prompt is given: zeros for both when the pipeline's
  ``force_zeros_for_empty_prompt`` (the released models' setting) is on, the encoded empty prompt otherwise.
- Added time ids: the UNet also takes ``time_ids`` = original size + crop top-left + target size, which the pipeline
  builds (``_get_add_time_ids``) as ``(H, W, 0, 0, H, W)`` in pixels for an ``H x W`` image when none are given;
  :meth:`StableDiffusionXL.denoise` passes the same, for the image size of the latents it is given.
- Timesteps: scheduler units in ``[0, num_train_timesteps)``. SDXL ships with ``EulerDiscreteScheduler``: it keeps
  ``x = x0 + sigma * eps`` and feeds the UNet ``x / sqrt(sigma^2 + 1)``, which is the DDPM-normalized
  ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` with ``a = 1 / (1 + sigma^2)`` (= ``alpha_bar_t`` at an integer ``t``).
  Its timesteps may be fractional (``timestep_spacing="linspace"``, Karras sigmas): ``alpha_bar`` there is
  ``1 / (1 + sigma(t)^2)`` with ``sigma(t)`` interpolated as the scheduler does (linearly in sigma, or in log sigma
  when the scheduler converts Karras/exponential/beta sigmas to timesteps), exact at integer timesteps.
- Prediction: epsilon (the released SDXL), v or sample, converted to eps with ``alpha_bar`` as for Stable Diffusion
  1.x/2.x. Training noises with ``alpha_bar`` at integer timesteps.
- Score: the pipeline makes one UNet call per step on the doubled batch ``[uncond, cond]``; the hook reads eps of
  both halves from it. With guidance <= 1 the hook repeats the call with the unconditional prompt embeddings and
  pooled embeddings (same latents, timestep and time ids).

memaudit builds the pipeline without the image encoder (IP-Adapter) and without the invisible watermark (it would
perturb the images the audit compares to the training set). Continuous-timestep (EDM-style) schedulers and
guidance-distilled UNets (``time_cond_proj_dim``) are refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from memaudit.families.base import Conditioning, DDPMFamily
from memaudit.families.common import unet_blocks, unet_call_parts, unet_transformer_blocks
from memaudit.families.tiny import CLIP_MAX_LENGTH, LATENT_SIZE, SDXL_VAE, clip_text_encoder, clip_tokenizer, tiny_vae

logger = logging.getLogger(__name__)

__all__ = ["StableDiffusionXL", "sigma_alpha_bar", "tiny"]

# SDXL's scheduler configuration (the released model's scheduler_config.json), for the tiny test pipeline
_SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                       interpolation_type="linear", use_karras_sigmas=False)


def sigma_alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, log_sigma: bool = False) -> torch.Tensor:
    """``alpha_bar = 1 / (1 + sigma(t)^2)`` (float32, on ``t``'s device), with ``sigma(t)`` interpolated between
    the integer timesteps' ``sigma = sqrt((1 - alpha_bar) / alpha_bar)`` as Euler-type schedulers do: linearly in
    sigma, or linearly in log sigma (``log_sigma``: the inverse of their ``_sigma_to_t``). Exact at integers."""
    ac = alphas_cumprod.double().to(t.device)
    sigmas = ((1 - ac) / ac).sqrt()
    tf = t.double().reshape(-1).clamp(0, len(ac) - 1)
    lo = tf.floor().long()
    hi = torch.clamp(lo + 1, max=len(ac) - 1)
    w = tf - lo.double()
    if log_sigma:
        logs = sigmas.log()
        sigma = (logs[lo] * (1 - w) + logs[hi] * w).exp()
    else:
        sigma = sigmas[lo] * (1 - w) + sigmas[hi] * w
    exact = w == 0
    out = torch.where(exact, ac[lo], 1 / (1 + sigma**2))
    return out.float()


def _index_config(parts: dict) -> dict:
    """The pipeline folder's ``model_index.json`` as loaded components remember it (their ``_name_or_path``), or
    ``{}`` when the components were not loaded from a folder holding one."""
    unet = parts.get("unet")
    where = getattr(getattr(unet, "config", None), "_name_or_path", None)
    if not where:
        return {}
    index = Path(str(where)) / "model_index.json"
    try:
        return json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError):
        return {}


class StableDiffusionXL(DDPMFamily):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    components = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                  "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer": ("CLIPTokenizer",),
                  "tokenizer_2": ("CLIPTokenizer",), "scheduler": ("",)}
    optional_none = ("image_encoder", "feature_extractor")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")

    # -- loading -------------------------------------------------------------------------------------------------
    def build_pipeline(self, cls, parts, index: dict | None = None):
        """The pipeline with ``force_zeros_for_empty_prompt`` as the folder's ``model_index.json`` says (default
        True, as in diffusers), no image encoder and no watermark."""
        index = _index_config(parts) if index is None else index
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return cls(**parts, **{k: None for k in self.optional_none}, force_zeros_for_empty_prompt=zeros,
                   add_watermarker=False)

    def ready(self, pipe):
        why = super().ready(pipe)
        if why:
            return why
        cfg = pipe.unet.config
        if cfg.get("addition_embed_type") != "text_time":
            return (f"its UNet has addition_embed_type {cfg.get('addition_embed_type')!r}, not SDXL's 'text_time'; "
                    "it is not an SDXL base UNet.")
        if cfg.get("time_cond_proj_dim") is not None:
            return ("its UNet is guidance-distilled (time_cond_proj_dim is set, as in LCM-SDXL); memaudit audits SDXL "
                    "UNets without a guidance embedding.")
        if pipe.scheduler.config.get("timestep_type", "discrete") != "discrete":
            return (f"its scheduler uses {pipe.scheduler.config.get('timestep_type')!r} timesteps; memaudit audits "
                    "SDXL with discrete timesteps (timestep_type='discrete').")
        return None

    # -- facts ---------------------------------------------------------------------------------------------------
    def alpha_bar(self, pipe, t):
        """``alpha_bar`` of the UNet input at timesteps ``t``: ``1 / (1 + sigma(t)^2)`` with ``sigma(t)`` as the
        scheduler relates sigmas and (possibly fractional) timesteps; ``alphas_cumprod[t]`` at integers."""
        cfg = pipe.scheduler.config
        log_sigma = any(bool(cfg.get(k, False))
                        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
        return sigma_alpha_bar(self.alphas_cumprod(pipe), torch.as_tensor(t).reshape(-1), log_sigma=log_sigma)

    def blocks(self, denoiser):
        return unet_blocks(denoiser)

    def transformer_blocks(self, denoiser):
        return unet_transformer_blocks(denoiser)

    # -- prompts -------------------------------------------------------------------------------------------------
    def encode(self, pipe, prompts, device):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    def unconditional(self, pipe, device):
        """Zeros shaped like the empty prompt's conditioning when ``force_zeros_for_empty_prompt`` (the pipeline's
        default), else the encoded empty prompt -- what the pipeline uses without a negative prompt."""
        empty = self.encode(pipe, [""], device)
        if pipe.config.get("force_zeros_for_empty_prompt", True):
            return Conditioning({k: torch.zeros_like(v) for k, v in empty.tensors.items()})
        return empty

    # -- the denoiser ----------------------------------------------------------------------------------------------
    def time_ids(self, pipe, height: int, width: int, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        """``[n, 6]`` added time ids of an ``height x width`` pixel image: original size = target size = the image
        size, crop (0, 0), built by the pipeline's own ``_get_add_time_ids``."""
        if getattr(pipe, "text_encoder_2", None) is not None:
            projection_dim = int(pipe.text_encoder_2.config.projection_dim)
        else:
            projection_dim = int(pipe.unet.add_embedding.linear_1.in_features
                                 - 6 * pipe.unet.config.addition_time_embed_dim)
        ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                     text_encoder_projection_dim=projection_dim)
        return ids.to(device).repeat(n, 1)

    def denoise(self, pipe, x, t, cond):
        scale = self.vae_scale_factor(pipe)
        embeds = cond.embeds
        ids = self.time_ids(pipe, x.shape[-2] * scale, x.shape[-1] * scale, x.shape[0], embeds.dtype, x.device)
        added = {"text_embeds": cond.tensors["pooled_prompt_embeds"], "time_ids": ids}
        return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def call_parts(self, pipe, args, kwargs, output):
        return unet_call_parts(args, kwargs, output)

    def recall(self, pipe, module, args, kwargs, uncond):
        kw = dict(kwargs)
        dtype = kw["encoder_hidden_states"].dtype
        kw["encoder_hidden_states"] = uncond.embeds.to(dtype)
        added = dict(kw.get("added_cond_kwargs") or {})
        added["text_embeds"] = uncond.tensors["pooled_prompt_embeds"].to(added["text_embeds"].dtype)
        kw["added_cond_kwargs"] = added
        out = module(*args, **kw)
        return out[0] if isinstance(out, tuple) else out.sample


# -- the tiny test pipeline ----------------------------------------------------------------------------------------
def tiny(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline``: CLIPTextModel + CLIPTextModelWithProjection (hidden 16 each, so a
    32-wide cross attention context and a 16-wide pooled embedding), a two-level UNet with SDXL's ``text_time``
    added conditioning, SDXL's EulerDiscreteScheduler, a 4-channel VAE with scaling factor 0.13025."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # measured cost

    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    text_encoder = clip_text_encoder(seed, tokenizer, hidden=16, layers=2, heads=2)
    text_encoder_2 = clip_text_encoder(seed, tokenizer, hidden=16, layers=2, heads=2, projection=16,
                                       with_projection=True, hidden_act="gelu")
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        norm_num_groups=4).eval()
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed, **SDXL_VAE), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)
