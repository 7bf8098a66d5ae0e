"""Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``): a rectified-flow MMDiT.

Architecture. The denoiser is an ``SD3Transformer2DModel``: latents ``[B, 16, H, W]`` are cut into ``patch_size``
patches and processed, jointly with the text tokens, by a stack of ``transformer_blocks`` (one JointTransformerBlock
each; these are the PEFT mask units). Three text encoders condition it: CLIP-L and CLIP-G
(``CLIPTextModelWithProjection`` both) give penultimate hidden states, concatenated along the width and zero-padded
to the T5 width, followed along the sequence by the T5-XXL encoder's (``T5EncoderModel``) states: that sequence is
``prompt_embeds``; the two CLIP projections concatenated are ``pooled_prompt_embeds``. memaudit requires the T5
encoder (``text_encoder_3``/``tokenizer_3``), although the pipeline accepts None there (it then uses zeros): a
checkpoint saved without T5 is refused at load time, naming the component. The optional SigLIP ``image_encoder`` and
``feature_extractor`` (IP-Adapter) are passed as None.

Conventions. Timesteps are the scheduler's: ``t = sigma * num_train_timesteps`` (sigma in (0, 1], 1000 at pure
noise), passed to the transformer as they are. The transformer predicts the velocity ``v = noise - x0`` of
``x_t = (1 - sigma) x0 + sigma noise``, so ``eps = x_t + (1 - sigma) v`` (:class:`FlowMatchingFamily`). Latents are
``(posterior - shift_factor) * scaling_factor`` (SD3: 0.0609 and 1.5305) and unpacked; the pipeline does not scale
initial noise. Sampling timesteps come from ``FlowMatchEulerDiscreteScheduler.set_timesteps``; with
``use_dynamic_shifting`` (resolution-dependent shift) the pipeline passes ``mu = calculate_shift(image_seq_len)``
with ``image_seq_len`` the number of patches, which :meth:`StableDiffusion3.first_step` replicates.

Score. The pipeline guides with classifier-free guidance on a doubled batch (unconditional half first), with the
empty prompt as the unconditional prompt (encoded by the same three encoders), so the hook of
:func:`memaudit.families.base.sample` reads ``||eps_c - eps_u||`` at every step at no extra cost. Skip-layer guidance
(SD3.5 Medium's option) is never switched on. At guidance <= 1 the pipeline makes no unconditional call and the hook
repeats the call with the empty prompt's conditioning (:meth:`StableDiffusion3.recall`). Caveat: the first step is
at sigma = 1, where ``eps = x_t`` whatever the prediction, so the eps-space norm is 0 there for every image; the
velocity difference ``||v_c - v_u||`` (``eps_c - eps_u = (1 - sigma)(v_c - v_u)``) is the informative quantity.
"""

from __future__ import annotations

import copy

import torch

from memaudit.families.base import Conditioning, FlowMatchingFamily, call_default
from memaudit.families.common import flow_scheduler_problem, transformer_call_parts
from memaudit.families.tiny import (
    CLIP_MAX_LENGTH,
    LATENT_SIZE,
    T5_MAX_LENGTH,
    clip_text_encoder,
    clip_tokenizer,
    t5_text_encoder,
    t5_tokenizer,
    tiny_vae,
)

#: the pipeline's default T5 length (``max_sequence_length`` of ``StableDiffusion3Pipeline.__call__``)
SD3_MAX_SEQUENCE_LENGTH = 256

# The released SD3's scheduler configuration and VAE latent statistics, for the tiny test pipeline
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
_SD3_VAE = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


class StableDiffusion3(FlowMatchingFamily):
    """SD3/SD3.5: see the module docstring."""

    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    components = {"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
                  "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
                  "text_encoder_3": ("T5EncoderModel",), "tokenizer": ("CLIPTokenizer",),
                  "tokenizer_2": ("CLIPTokenizer",), "tokenizer_3": ("T5Tokenizer",), "scheduler": ("",)}
    optional_none = ("image_encoder", "feature_extractor")
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    classifier_free_guidance = True

    # -- prompts ---------------------------------------------------------------------------------------------
    def max_sequence_length(self, pipe) -> int:
        """T5 tokens: the default of the pipeline's ``__call__`` (256), which a plain ``pipe(prompt)`` uses whatever
        the T5 tokenizer's ``model_max_length`` (it pads and truncates to this length), so the images are plain
        diffusers' for the call users make."""
        return int(call_default(pipe, "max_sequence_length", SD3_MAX_SEQUENCE_LENGTH))

    def encode(self, pipe, prompts, device):
        """``prompt_embeds`` ``[B, 77 + T5 length, 4096]`` and ``pooled_prompt_embeds`` ``[B, 2048]`` (real SD3
        sizes) from the pipeline's own ``encode_prompt`` (not under no_grad: gradients flow when enabled)."""
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})

    # The pipeline's unconditional prompt is the empty one, encoded like any other: the base's default.
    # pipeline_kwargs: the base's (prompt_embeds, pooled_prompt_embeds and their negative_* counterparts). No
    # max_sequence_length is passed: with embeddings given for both halves the pipeline encodes nothing, so it is
    # unused (only checked to be <= 512), and pipeline_kwargs does not see the pipeline to compute it.

    # -- the denoiser ------------------------------------------------------------------------------------------
    def denoise(self, pipe, x, t, cond):
        """The velocity, called as the pipeline calls the transformer (timestep in scheduler units)."""
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                                pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False)[0]

    def call_parts(self, pipe, args, kwargs, output):
        return transformer_call_parts(kwargs, output)

    def recall(self, pipe, module, args, kwargs, uncond):
        kw = dict(kwargs)
        kw["encoder_hidden_states"] = uncond.embeds.to(kw["encoder_hidden_states"].dtype)
        kw["pooled_projections"] = uncond.tensors["pooled_prompt_embeds"].to(kw["pooled_projections"].dtype)
        out = module(*args, **kw)
        return out[0] if isinstance(out, tuple) else out.sample

    def sampling_timesteps(self, pipe, latents: torch.Tensor, steps: int) -> torch.Tensor:
        """The pipeline's timesteps for ``steps`` steps from ``latents`` (they set the image size): what
        ``retrieve_timesteps`` gives, with ``mu = calculate_shift(image_seq_len)`` (``image_seq_len`` the number of
        transformer patches) for schedulers with dynamic shifting, as the pipeline computes them."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        sched = copy.deepcopy(pipe.scheduler)  # a copy keeps a shift set with set_shift, which the config lacks
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            patch = int(pipe.transformer.config.patch_size)
            h, w = latents.shape[-2:]
            kwargs["mu"] = calculate_shift((h // patch) * (w // patch),
                                           sched.config.get("base_image_seq_len", 256),
                                           sched.config.get("max_image_seq_len", 4096),
                                           sched.config.get("base_shift", 0.5),
                                           sched.config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=None, **kwargs)
        return timesteps

    def first_step(self, pipe, latents, steps, resolution):
        """``latents`` unchanged (the pipeline does not scale its initial noise) and the first of
        :meth:`sampling_timesteps`."""
        return latents, self.sampling_timesteps(pipe, latents, steps)[0]

    def blocks(self, denoiser):
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]

    def ready(self, pipe):
        return flow_scheduler_problem(pipe)


# -- the tiny test pipeline ----------------------------------------------------------------------------------------
def tiny(seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline``: an SD3Transformer2DModel (2 joint blocks, patch 2), CLIP-L (hidden 8)
    and CLIP-G (hidden 16), both with projection, a T5 encoder (d_model 32: the CLIP states, 24 wide, are zero-padded
    to it as in SD3), FlowMatchEulerDiscreteScheduler (shift 3) and a 16-channel VAE with SD3's shift/scaling."""
    from diffusers import (  # diffusers: a measured import cost, paid only for test models
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    tokenizer_3 = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = clip_text_encoder(seed, tokenizer, hidden=8, layers=2, heads=2, with_projection=True)
    text_encoder_2 = clip_text_encoder(seed, tokenizer, hidden=16, layers=2, heads=2, with_projection=True,
                                       hidden_act="gelu")
    text_encoder_3 = t5_text_encoder(seed, tokenizer_3)
    heads, head_dim = 2, 8
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=text_encoder_3.config.d_model,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=2 * LATENT_SIZE).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULER),
        vae=tiny_vae(seed, **_SD3_VAE), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=None,
        feature_extractor=None)
