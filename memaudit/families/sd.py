"""Stable Diffusion 1.x and 2.x: a UNet conditioned on one CLIP text encoder's hidden states; epsilon, v or sample
prediction under a DDPM-type scheduler.

Its tiny test pipeline is built by :func:`memaudit.testing.tiny_pipeline` (:mod:`memaudit.models` builds SD-layout
pipelines of any size), which :func:`memaudit.tiny_families.tiny_sd` calls.
"""

from __future__ import annotations

from memaudit.families.base import Conditioning, DDPMFamily
from memaudit.families.common import unet_blocks, unet_call_parts, unet_transformer_blocks


class StableDiffusion(DDPMFamily):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    components = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                  "tokenizer": ("CLIPTokenizer",), "scheduler": ("",)}
    optional_none = ("safety_checker", "feature_extractor")

    def build_pipeline(self, cls, parts, index=None):
        return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    def encode(self, pipe, prompts, device):
        embeds, _ = pipe.encode_prompt(list(prompts), device, 1, False)
        return Conditioning({"prompt_embeds": embeds})

    def denoise(self, pipe, x, t, cond):
        return pipe.unet(x, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def call_parts(self, pipe, args, kwargs, output):
        return unet_call_parts(args, kwargs, output)

    def recall(self, pipe, module, args, kwargs, uncond):
        kw = dict(kwargs)
        kw["encoder_hidden_states"] = uncond.embeds.to(kw["encoder_hidden_states"].dtype)
        out = module(*args, **kw)
        return out[0] if isinstance(out, tuple) else out.sample

    def blocks(self, denoiser):
        return unet_blocks(denoiser)

    def transformer_blocks(self, denoiser):
        return unet_transformer_blocks(denoiser)
