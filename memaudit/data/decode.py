"""Decoding: an image file of any mode PIL opens becomes float32 pixels at the model's resolution.

Every image mode PIL opens decodes to the picture its 8-bit conversion shows (:func:`to_8bit`): 16-bit images
(``I;16*``, and ``I`` read from a 16-bit file) are scaled so that 65535 is white, 32-bit integers by their type's
maximum, 32-bit floats are read as ``[0, 1]`` when all their values lie there and as ``[0, 255]`` (PIL's own
convention) otherwise; transparency is dropped, as for ``RGBA``: the colour channels are kept as stored (palette
images with transparency, ``PA``, ``LA``; premultiplied ``RGBa``/``La`` are un-premultiplied first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from memaudit.core.errors import DataError

__all__ = ["DECODE_VERSION", "load_image", "strict_image_loading", "to_8bit"]

#: How a file becomes pixels (:func:`to_8bit` and the resize); part of every file's image key, so that a change of
#: the decoding (version 2: 16-bit, 32-bit and float images scaled to their range) re-encodes cached entries.
DECODE_VERSION = 2


@contextlib.contextmanager
def strict_image_loading() -> Iterator[None]:
    """Make PIL refuse truncated images for the duration of the block, then restore the previous setting."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


#: 8-bit modes whose transparency is dropped on the way to ``L`` or ``RGB``, through this straight-alpha mode
_ALPHA_VIA = {"P": "RGBA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}


def _integer_full_scale(im: Image.Image) -> int:
    """The value that is white in a 32-bit integer (``I``) image: the maximum of the file's sample type. PIL reads
    16-bit PNG, PGM and TIFF samples into ``I`` too: those (and any file that does not declare its sample size)
    are 16-bit, 65535."""
    tags = getattr(im, "tag_v2", None)
    bits = sample_format = None
    if tags is not None:
        bits, sample_format = tags.get(258), tags.get(339)  # BitsPerSample, SampleFormat
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if bits is None or int(bits) <= 16:
        return 65535
    return 2 ** (int(bits) - 1) - 1 if sample_format == 2 else 2 ** int(bits) - 1


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` (any mode PIL opens) as the 8-bit image its proper conversion shows, in a mode that converts to ``L``
    and ``RGB`` without loss of meaning.

    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: ``round(v / 257)`` (65535 is white).
    - ``I`` (32-bit integers): scaled by the file's sample maximum (:func:`_integer_full_scale`: 65535 for the
      16-bit files PIL reads as ``I``), negative values black.
    - ``F`` (32-bit floats): ``[0, 1]`` to ``[0, 255]`` when every value lies in ``[0, 1]``, else read as
      ``[0, 255]`` like PIL's own conversion; values outside are clipped. A NaN or infinite value is an error.
    - palette images (with or without transparency), ``PA``, premultiplied ``RGBa`` and ``La``: through ``RGBA`` /
      ``LA`` (colours as stored; the alpha is dropped by the final conversion, as for ``RGBA`` files).
    - every other mode (``1``, ``L``, ``LA``, ``RGB``, ``RGBA``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) is
      8-bit already and left to PIL's conversion.

    Raises:
        ValueError: a float image holds NaN or infinite values.
    """
    mode = im.mode
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        scaled = np.clip(arr, 0, None) * (255.0 / _integer_full_scale(im))
        return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("a 32-bit float image holds NaN or infinite values")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8), mode="L")
    if mode in _ALPHA_VIA:
        return im.convert(_ALPHA_VIA[mode])
    return im


def load_image(path: Path, mode: str, resolution: int) -> torch.Tensor:
    """Load one image as float32 ``[C, resolution, resolution]`` in ``[-1, 1]`` (shorter side resized, centre crop):
    :func:`to_8bit`, then converted to ``mode`` (``L`` or ``RGB``)."""
    try:
        with Image.open(path) as im:
            im.load()
            img = to_8bit(im).convert(mode)
    # PIL signals broken files with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # DecompressionBombError, struct.error...); any of them means the file cannot be used.
    except Exception as e:
        raise DataError(
            f"Image {path} is unreadable or truncated ({type(e).__name__}: {e}); replace or remove it."
        ) from e
    w, h = img.size
    if w < 1 or h < 1:
        raise DataError(f"Image {path} has size {w}x{h}; replace or remove it.")
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr.to(torch.float32) / 127.5 - 1.0
