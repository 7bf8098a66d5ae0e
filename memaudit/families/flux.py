"""Flux.1 dev and schnell (``FluxPipeline``): a rectified-flow transformer on packed latents, guidance-distilled.

Architecture. The denoiser is a ``FluxTransformer2DModel``: ``transformer_blocks`` (double-stream MMDiT blocks)
then ``single_transformer_blocks`` (single-stream), in that forward order; each block is one PEFT mask unit. Two
text encoders: a ``CLIPTextModel`` whose pooled output is ``pooled_prompt_embeds`` and a ``T5EncoderModel`` whose
last hidden states are ``prompt_embeds`` (``[B, max_sequence_length, 4096]``, always padded to that length, so the
text position ids ``txt_ids``, all zeros, depend only on it). The optional CLIP ``image_encoder`` and
``feature_extractor`` (IP-Adapter) are passed as None. The dev variant has a guidance embedding
(``transformer.config.guidance_embeds``): the guidance scale is an *input* of the transformer, not a mixture of
two predictions; schnell has none (and is meant for few steps at shift 1).

Conventions. Latents ``[B, 16, H, W]`` (``H = 2 * (resolution // (2 * vae_scale_factor))``) are
``(posterior - shift_factor) * scaling_factor`` (Flux: 0.1159 and 0.3611); the transformer takes them packed into
``[B, H/2 * W/2, 64]`` tokens of 2x2 patches (:func:`memaudit.families.base.pack_2x2`, the pipeline's
``_pack_latents``) with image position ids ``img_ids`` (row, column of each patch). Every method here takes and
returns *unpacked* latents except :meth:`Flux.initial_latents`, which returns them packed because the pipeline's
``latents=`` argument takes them so. Timesteps are the scheduler's, ``t = sigma * 1000``; the pipeline passes
``t / 1000`` to the transformer (which multiplies by 1000 again) and so does :meth:`Flux.denoise`. The transformer
predicts the velocity ``v = noise - x0``, so ``eps = x_t + (1 - sigma) v``. Sampling sigmas are
``linspace(1, 1/steps, steps)``, shifted by the scheduler: dev uses dynamic (resolution-dependent) shifting with
``mu = calculate_shift(image_seq_len)``, ``image_seq_len`` being the number of packed tokens; schnell a static
shift of 1. :meth:`Flux.first_step` replicates both.

Guidance. In the pipeline the dev transformer embeds ``guidance_scale`` (default 3.5); memaudit's ``--guidance`` is
passed as that ``guidance_scale``. Direct denoiser calls (:meth:`Flux.denoise`: training, the first-step score of
:meth:`memaudit.sampling.Sampler.first_step_norms`, the attacks) embed :attr:`Flux.guidance_scale`, 3.5 by default:
both the pipeline's default and the ``--guidance_scale`` default of diffusers' ``train_dreambooth_flux.py`` and
``train_dreambooth_lora_flux.py``, which pass it to the transformer during training. Set the attribute (or pass
``guidance=`` to :meth:`Flux.denoise`) to score at the audit's own guidance. schnell ignores guidance.

Score. FluxPipeline makes no unconditional prediction (``classifier_free_guidance = False``; memaudit never passes
``negative_*`` arguments, which would switch on the pipeline's "true CFG"). The hook of
:func:`memaudit.families.base.sample` therefore repeats the transformer call with the empty prompt's
``encoder_hidden_states`` and ``pooled_projections`` (:meth:`Flux.recall`) at the steps the sampler scores (default
the first only), everything else (packed latents, timestep, guidance, ids) unchanged; other steps' norms are NaN.
Caveat: the first step is at sigma = 1, where ``eps = x_t`` whatever the prediction, so the eps-space norm is 0
there for every image; the velocity difference ``||v_c - v_u||`` (``eps_c - eps_u = (1 - sigma)(v_c - v_u)``) is
the informative quantity.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from memaudit.families.base import Conditioning, FlowMatchingFamily, call_default, pack_2x2, unpack_2x2
from memaudit.families.common import flow_scheduler_problem, transformer_call_parts
from memaudit.families.tiny import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    clip_text_encoder,
    clip_tokenizer,
    t5_text_encoder,
    t5_tokenizer,
    tiny_vae,
)

#: the pipeline's default T5 length (``max_sequence_length`` of ``FluxPipeline.__call__``)
FLUX_MAX_SEQUENCE_LENGTH = 512
#: FluxPipeline's default ``guidance_scale`` and train_dreambooth_flux.py's ``--guidance_scale``
FLUX_GUIDANCE = 3.5

# The released variants' scheduler configurations and the Flux VAE's latent statistics, for the tiny test pipeline
_FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
_FLUX_VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[h * w, 3]`` position ids of packed tokens (0, row, column): FluxPipeline's ``_prepare_latent_image_ids``
    for ``h x w`` tokens (half the latent height and width)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class Flux(FlowMatchingFamily):
    """Flux.1 dev/schnell: see the module docstring."""

    name = "flux"
    title = "Flux.1 (dev, schnell)"
    pipeline_classes = ("FluxPipeline",)
    components = {"transformer": ("FluxTransformer2DModel",), "vae": ("AutoencoderKL",),
                  "text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",),
                  "tokenizer": ("CLIPTokenizer",), "tokenizer_2": ("T5Tokenizer",), "scheduler": ("",)}
    optional_none = ("image_encoder", "feature_extractor")
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    classifier_free_guidance = False
    #: the transformer takes the guidance as an input (dev): :meth:`denoise` accepts ``guidance=``
    embedded_guidance = True

    def __init__(self, guidance_scale: float = FLUX_GUIDANCE):
        #: the guidance the dev transformer embeds in direct calls (:meth:`denoise`); see the module docstring
        self.guidance_scale = float(guidance_scale)

    # -- facts -----------------------------------------------------------------------------------------------
    def resolution(self, pipe) -> int:
        """The VAE's ``sample_size`` (1024 for Flux.1's VAE; the tiny test model's is 32): FluxPipeline's own
        default (128 latents, ``default_sample_size``) ignores the model, and the transformer has no size."""
        return int(pipe.vae.config.sample_size)

    def latent_shape(self, pipe, resolution):
        """``(C, H, W)`` as ``prepare_latents`` makes them: sides rounded down to even (packing needs 2x2)."""
        side = 2 * (int(resolution) // (self.vae_scale_factor(pipe) * 2))
        return (int(pipe.vae.config.latent_channels), side, side)

    def guidance_embedded(self, pipe) -> bool:
        """Whether the transformer takes a guidance input (dev) or not (schnell)."""
        return bool(pipe.transformer.config.guidance_embeds)

    # -- prompts ---------------------------------------------------------------------------------------------
    def max_sequence_length(self, pipe) -> int:
        """T5 tokens: the default of the pipeline's ``__call__`` (512), which a plain ``pipe(prompt)`` uses whatever
        the T5 tokenizer's ``model_max_length`` (it pads and truncates to this length), so the images are plain
        diffusers' for the call users make."""
        return int(call_default(pipe, "max_sequence_length", FLUX_MAX_SEQUENCE_LENGTH))

    def encode(self, pipe, prompts, device):
        """T5 ``prompt_embeds`` and CLIP ``pooled_prompt_embeds`` from the pipeline's own ``encode_prompt`` (not
        under no_grad: gradients flow when enabled)."""
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    def pipeline_kwargs(self, cond, uncond):
        """The conditioning only (no ``negative_*``: that would switch on true CFG), and ``max_sequence_length``
        equal to the T5 length the embeddings were encoded with."""
        return {**self.call_kwargs, **cond.tensors, "max_sequence_length": int(cond.embeds.shape[1])}

    # -- the denoiser ------------------------------------------------------------------------------------------
    def denoise(self, pipe, x, t, cond, guidance: float | None = None):
        """The velocity for unpacked ``x`` ``[B, C, H, W]``, unpacked: ``x`` packed, ids built and the transformer
        called as FluxPipeline calls it (``timestep / 1000``; for dev ``guidance``, default
        :attr:`guidance_scale`)."""
        b, _, h, w = x.shape
        g = None
        if self.guidance_embedded(pipe):
            value = self.guidance_scale if guidance is None else float(guidance)
            g = torch.full([1], value, device=x.device, dtype=torch.float32).expand(b)
        embeds = cond.embeds
        timestep = torch.as_tensor(t, device=x.device).reshape(-1).expand(b).to(x.dtype)
        out = pipe.transformer(
            hidden_states=pack_2x2(x.contiguous()), timestep=timestep / 1000, guidance=g,
            pooled_projections=cond.tensors["pooled_prompt_embeds"], encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=latent_image_ids(h // 2, w // 2, x.device, x.dtype), return_dict=False)[0]
        return unpack_2x2(out, h, w)

    def call_parts(self, pipe, args, kwargs, output):
        """Packed latents, the timestep back in scheduler units (the pipeline passed ``t / 1000``), packed output."""
        x, t, out = transformer_call_parts(kwargs, output)
        return x, t * 1000, out

    def recall(self, pipe, module, args, kwargs, uncond):
        kw = dict(kwargs)
        embeds = uncond.embeds.to(kw["encoder_hidden_states"].dtype)
        kw["encoder_hidden_states"] = embeds
        kw["pooled_projections"] = uncond.tensors["pooled_prompt_embeds"].to(kw["pooled_projections"].dtype)
        txt_ids = kw.get("txt_ids")
        if txt_ids is not None and txt_ids.shape[-2] != embeds.shape[1]:  # another T5 length: ids are all zeros
            kw["txt_ids"] = txt_ids.new_zeros(*txt_ids.shape[:-2], embeds.shape[1], txt_ids.shape[-1])
        out = module(*args, **kw)
        return out[0] if isinstance(out, tuple) else out.sample

    # -- latents ---------------------------------------------------------------------------------------------
    def initial_latents(self, pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
        """What ``prepare_latents`` draws from one generator per image (unpacked ``(C, H, W)`` each), packed as the
        pipeline's ``latents=`` takes them: ``[B, H/2 * W/2, 4C]``."""
        shape = self.latent_shape(pipe, resolution)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return pack_2x2(x)

    def sampling_timesteps(self, pipe, latents: torch.Tensor, steps: int) -> torch.Tensor:
        """The pipeline's timesteps for ``steps`` steps from packed ``latents``: sigmas ``linspace(1, 1/steps,
        steps)`` (none with ``use_flow_sigmas``) and ``mu = calculate_shift(image_seq_len)`` (``image_seq_len`` the
        number of packed tokens), through ``retrieve_timesteps``, as FluxPipeline computes them."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = copy.deepcopy(pipe.scheduler)  # a copy keeps a shift set with set_shift, which the config lacks
        cfg = sched.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(cfg, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
        return timesteps

    def unpacked(self, pipe, x, resolution):
        _, h, w = self.latent_shape(pipe, resolution)
        return unpack_2x2(x, h, w)

    def first_step(self, pipe, latents, steps, resolution):
        """``latents`` (packed, as :meth:`initial_latents` gives them) unpacked, and the first of
        :meth:`sampling_timesteps`."""
        _, h, w = self.latent_shape(pipe, resolution)
        return unpack_2x2(latents, h, w), self.sampling_timesteps(pipe, latents, steps)[0]

    def blocks(self, denoiser):
        return ([f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
                + [f"single_transformer_blocks.{i}" for i in range(len(denoiser.single_transformer_blocks))])

    def ready(self, pipe):
        return flow_scheduler_problem(pipe)


# -- the tiny test pipeline ----------------------------------------------------------------------------------------
def tiny(variant: str = "dev", seed: int = 0):
    """A tiny ``FluxPipeline`` of the ``"dev"`` (guidance-distilled: guidance embedding, dynamic shifting) or
    ``"schnell"`` (no guidance embedding, shift 1) variant: FluxTransformer2DModel (1 double + 1 single block,
    64 packed input channels), a CLIP text model (pooled, hidden 16), a T5 encoder (d_model 32) and a 16-channel
    VAE with Flux's shift/scaling. Pass ``height``/``width`` (:data:`memaudit.families.tiny.RESOLUTION`) when
    calling it: Flux's own default is 256 px here."""
    from diffusers import (  # diffusers: a measured import cost, paid only for test models
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    if variant not in _FLUX_SCHEDULERS:
        raise ValueError(f"Flux variant {variant!r} is not one of {', '.join(_FLUX_SCHEDULERS)}")
    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    tokenizer_2 = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = clip_text_encoder(seed, tokenizer, hidden=16, layers=2, heads=2)
    text_encoder_2 = t5_text_encoder(seed, tokenizer_2)
    latent_channels = _FLUX_VAE["latent_channels"]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 4, 8)).eval()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULERS[variant]),
        vae=tiny_vae(seed, **_FLUX_VAE), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, image_encoder=None, feature_extractor=None)
