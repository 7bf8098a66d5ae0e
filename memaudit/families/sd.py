"""Stable Diffusion 1.x and 2.x: a UNet conditioned on one CLIP text encoder's hidden states; epsilon, v or sample
prediction under a DDPM-type scheduler."""

from __future__ import annotations

import torch

from memaudit.families.base import Conditioning, DDPMFamily


def unet_call_parts(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent input, timestep and output of a ``UNet2DConditionModel`` call as diffusers' pipelines make it."""
    x = args[0] if args else kwargs["sample"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    out = output[0] if isinstance(output, tuple) else output.sample
    return x, torch.as_tensor(t, device=x.device).reshape(-1), out


def unet_blocks(unet: torch.nn.Module) -> list[str]:
    """A UNet's transformer-bearing blocks in forward order: each down block, the mid block, each up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


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
