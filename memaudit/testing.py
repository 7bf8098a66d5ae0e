"""Tiny Stable Diffusion pipelines built in code, for tests and examples: no network, milliseconds to run."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from memaudit.models import ModelSpec, build_pipeline
from memaudit.tokenizers import build_clip_tokenizer


@lru_cache(maxsize=4)
def clip_tokenizer(max_length: int):
    """The full CLIP tokenizer padding and truncating to ``max_length`` tokens, as :func:`tiny_pipeline` uses it
    (cached: do not modify)."""
    return build_clip_tokenizer(model_max_length=max_length)


def tiny_pipeline(prediction_type: str = "epsilon", scheduler: str = "ddim", image_channels: int = 3,
                  resolution: int = 16, seed: int = 0, max_length: int = 16):
    """A tiny SD pipeline (random weights) with the real, full CLIP tokenizer.

    The prompt length is shortened to ``max_length`` tokens to keep tests fast; everything else has the layout
    of Stable Diffusion 1.x.
    """
    spec = ModelSpec(image_channels=image_channels, resolution=resolution, prediction_type=prediction_type,
                     scheduler=scheduler, max_length=max_length)
    return build_pipeline(spec, tokenizer=clip_tokenizer(max_length), seed=seed)


def save_tiny_pipeline(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`tiny_pipeline` to ``path`` as a diffusers folder (safetensors) and return the path."""
    pipe = tiny_pipeline(**kwargs)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def save_image_folder(dataset, path: str | os.PathLike) -> Path:
    """An in-memory dataset written as a folder of PNGs with a ``captions.csv`` (as a user passes it to ``--train``);
    returns the folder, created with its parents."""
    import csv

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        for i in range(len(dataset)):
            dataset.to_pil(i).save(path / f"{i}.png")
            writer.writerow([f"{i}.png", dataset.captions[i]])
    return path


def count_encodes(target) -> list[int]:
    """Replace ``target.encode_images`` by a wrapper that records how many images each call encodes (for tests of
    the latent cache: what was encoded again, and what was found)."""
    calls: list[int] = []
    real = target.encode_images

    def encode(images, batch_size=64):
        calls.append(len(images))
        return real(images, batch_size)

    target.encode_images = encode
    return calls
