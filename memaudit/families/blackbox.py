"""Any other text-to-image diffusers pipeline, audited as a black box: by its images only.

A pipeline of no known family (:data:`memaudit.families.FAMILIES`) whose ``__call__`` takes ``prompt``,
``num_images_per_prompt``, ``generator`` and ``output_type`` (and is not an image-to-image, inpainting, video or
unconditional pipeline, by its class name) is sampled through that call, one generator per image, so its images
are plain diffusers'. The extraction attack and AMD need nothing more. The denoising strength needs the
denoiser's conditional and unconditional predictions, which memaudit only knows how to read for its families: its
columns stay empty (NaN) and the report says why. Training, baselines that change the conditioning (threshold) and
the VAE round trip shown beside training images need a known family too.

The image size and channels are learned by generating one image (seed 0, one step where the pipeline takes
``num_inference_steps``) when the pipeline is wrapped.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import ClassVar

import torch

from memaudit.core.errors import TargetError
from memaudit.families.base import Family

#: pipeline class names with these parts are not text-to-image
NOT_TEXT_TO_IMAGE = ("Img2Img", "Image2Image", "ImageToImage", "Inpaint", "Video", "ControlNet", "Upscale", "Depth",
                     "InstructPix2Pix", "Variation", "Audio", "Music", "Unconditional", "SuperRes", "Inversion",
                     "Adapter", "Edit")
REQUIRED_ARGS = ("prompt", "num_images_per_prompt", "generator", "output_type")


def black_box_refusal(cls_name: str, cls) -> str | None:
    """Why a pipeline class cannot be audited as a black box (None when it can)."""
    if cls is None:
        return f"{cls_name} is not a diffusers pipeline class installed here"
    if any(part in cls_name for part in NOT_TEXT_TO_IMAGE):
        return f"{cls_name} is not a text-to-image pipeline"
    params = inspect.signature(cls.__call__).parameters
    missing = [a for a in REQUIRED_ARGS if a not in params]
    if missing:
        return f"{cls_name}'s call takes no {', '.join(missing)}, so it is not a text-to-image pipeline memaudit can drive"
    return None


class BlackBox(Family):
    """A text-to-image pipeline of no known family (one instance per pipeline: it learns the image size)."""

    name = "blackbox"
    title = "other text-to-image pipeline (black box: images only)"
    black_box: ClassVar[bool] = True
    classifier_free_guidance = False
    denoiser_name = ""
    text_encoder_names = ()
    tokenizer_names = ("tokenizer",)

    def __init__(self):
        self.channels: int | None = None
        self.size: int | None = None

    def module_names(self, pipe) -> list[str]:
        return [n for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)]

    def denoiser(self, pipe):
        raise TargetError(f"{type(pipe).__name__} is audited as a black box: memaudit cannot read its denoiser.")

    def ready(self, pipe) -> str | None:
        if self.size is None:
            images = self.generate(pipe, ["a photo"], [0], steps=1, guidance=None, resolution=None)
            if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
                return (f"its images have shape {tuple(images.shape)}; memaudit audits square images "
                        "([batch, channels, side, side]).")
            self.channels, self.size = int(images.shape[1]), int(images.shape[-1])
        return None

    def resolution(self, pipe) -> int:
        return int(self.size)

    def image_channels(self, pipe) -> int:
        return int(self.channels)

    def prediction_type(self, pipe) -> str:
        return "unknown (black box)"

    def generate(self, pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None,
                 guidance: float | None, resolution: int | None) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [0, 1] (float32, CPU) of ``prompts``, one generator per image."""
        params = inspect.signature(type(pipe).__call__).parameters
        kw = {"prompt": list(prompts), "num_images_per_prompt": 1, "output_type": "pt",
              "generator": [torch.Generator().manual_seed(int(s)) for s in seeds]}
        if steps is not None and "num_inference_steps" in params:
            kw["num_inference_steps"] = steps
        if guidance is not None and "guidance_scale" in params:
            kw["guidance_scale"] = guidance
        if resolution is not None and "height" in params and "width" in params:
            kw["height"] = kw["width"] = resolution
        with torch.no_grad():
            out = pipe(**kw)
        images = getattr(out, "images", None)
        if images is None:
            images = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(images, torch.Tensor):
            raise TargetError(f"{type(pipe).__name__} returned {type(images).__name__} for output_type='pt', not a "
                              "tensor; memaudit cannot audit it.")
        return images.float().cpu().clamp(0, 1)
