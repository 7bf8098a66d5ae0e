"""Small image helpers shared by the audit and the demo check: tile grids and PNG encoding."""

from __future__ import annotations

import io

import torch


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """``[N, C, H, W]`` images in [0, 1] tiled ``columns`` wide (white padding) into one ``[C, H', W']`` image."""
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    pad = torch.ones(rows * columns - n, c, h, w)
    tiles = torch.cat([images, pad]).reshape(rows, columns, c, h, w)
    return tiles.permute(2, 0, 3, 1, 4).reshape(c, rows * h, columns * w)


def grid_columns(n: int, max_columns: int = 8) -> int:
    """Columns of a grid of ``n`` images: one row up to ``max_columns``, else the fewest rows of equal width (16
    images: 8 x 2, 10: 5 x 2, 12: 6 x 2), so a grid holds no empty cells where it can."""
    if n <= max_columns:
        return max(1, n)
    rows = -(-n // max_columns)
    return -(-n // rows)


def png_bytes(image: torch.Tensor, tile: int | None = None, scale: int | None = None, min_tile_px: int = 96) -> bytes:
    """A ``[C, H, W]`` image in [0, 1] as PNG bytes, enlarged (nearest neighbour) by ``scale``, or by default by
    the whole factor that shows a ``tile``-pixel image (default: the image's width) at least ``min_tile_px`` wide."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale is None:
        scale = max(1, min_tile_px // (tile or image.shape[-1]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
