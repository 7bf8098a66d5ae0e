"""Every image mode PIL opens decodes, through the dataset loader, to the picture its 8-bit conversion shows: 16-bit
images are scaled (65535 is white, not every value above 255), 32-bit integers by their type's maximum, floats by the
documented rule; transparency is dropped as for RGBA (colours as stored)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memaudit.core.errors import DataError
from memaudit.data import load_dataset, native_channels, to_8bit

SIDE = 8
RNG = np.random.default_rng(7)
RGB = RNG.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
GRADIENT16 = (np.arange(SIDE * SIDE, dtype=np.float64).reshape(SIDE, SIDE) * 65535 / (SIDE * SIDE - 1)).round()


def decoded(tmp_path: Path, image: Image.Image, suffix: str, channels: int = 3) -> np.ndarray:
    """``image`` written as ``x<suffix>`` in a dataset folder and read back through the loader: ``[H, W, C]`` in
    0..255 (float)."""
    folder = tmp_path / f"data-{image.mode.replace(';', '_')}-{suffix[1:]}-{channels}"
    n = 0
    while folder.exists():
        n += 1
        folder = folder.with_name(f"{folder.name.split('.')[0]}.{n}")
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image.save(folder / f"x{suffix}")
    (folder / "x.txt").write_text("a caption")
    x = load_dataset(folder, SIDE, channels).read([0])[0]
    return ((x.numpy() + 1.0) * 127.5).transpose(1, 2, 0)


def gray3(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(a, dtype=np.float64)[..., None], 3, axis=2)


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.0 + 1e-4, np.abs(got - want).max()  # one level of 255


def test_a_16bit_gradient_is_not_white(tmp_path):
    im = Image.fromarray(GRADIENT16.astype(np.uint16))
    assert im.mode == "I;16"
    got = decoded(tmp_path, im, ".png", channels=1)
    close(got[..., 0], np.rint(GRADIENT16 / 257))
    assert got.min() == 0 and got.max() == 255 and 100 < got.mean() < 155
    close(decoded(tmp_path, im, ".tif", channels=3), gray3(np.rint(GRADIENT16 / 257)))


def test_big_endian_16bit_and_mode_I_from_a_16bit_file(tmp_path):
    big = Image.fromarray(GRADIENT16.astype(">u2"))
    assert big.mode == "I;16B"
    close(decoded(tmp_path, big, ".tif"), gray3(np.rint(GRADIENT16 / 257)))
    as_i = Image.fromarray(GRADIENT16.astype(np.uint16)).convert("I")  # what older Pillow gives for 16-bit PNGs
    assert as_i.mode == "I"
    close(np.asarray(to_8bit(as_i), dtype=np.float64), np.rint(GRADIENT16 / 257))


def test_32bit_integers_are_scaled_by_their_type(tmp_path):
    values = (np.arange(SIDE * SIDE, dtype=np.int64).reshape(SIDE, SIDE) * (2**31 - 1) // (SIDE * SIDE - 1))
    values[0, 0] = -5  # negative: black
    im = Image.fromarray(values.astype(np.int32))
    assert im.mode == "I"
    want = np.rint(np.clip(values, 0, None) * 255 / (2**31 - 1))
    close(decoded(tmp_path, im, ".tif", channels=1)[..., 0], want)


def test_floats_in_0_1_and_in_0_255(tmp_path):
    unit = RNG.random((SIDE, SIDE)).astype(np.float32)
    unit[0, 0], unit[0, 1] = 0.0, 1.0
    close(decoded(tmp_path, Image.fromarray(unit), ".tif", channels=1)[..., 0], np.rint(unit.astype(np.float64) * 255))
    wide = (RNG.random((SIDE, SIDE)) * 300 - 20).astype(np.float32)  # PIL's 0..255 reading, clipped
    close(decoded(tmp_path, Image.fromarray(wide), ".tif", channels=1)[..., 0],
          np.rint(np.clip(wide.astype(np.float64), 0, 255)))
    bad = unit.copy()
    bad[3, 3] = np.nan
    with pytest.raises(DataError, match="NaN"):
        decoded(tmp_path, Image.fromarray(bad), ".tiff", channels=1)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_eight_bit_modes_with_and_without_transparency(tmp_path, suffix):
    rgb = Image.fromarray(RGB)
    gray = rgb.convert("L")
    close(decoded(tmp_path, rgb, suffix), RGB.astype(np.float64))
    rgba = Image.fromarray(np.dstack([RGB, ALPHA]))
    close(decoded(tmp_path, rgba, suffix), RGB.astype(np.float64))  # colours as stored, alpha dropped
    close(decoded(tmp_path, gray, suffix), gray3(np.asarray(gray)))
    la = Image.fromarray(np.dstack([np.asarray(gray), ALPHA]), mode="LA")
    close(decoded(tmp_path, la, suffix), gray3(np.asarray(gray)))
    close(decoded(tmp_path, la, suffix, channels=1)[..., 0], np.asarray(gray, dtype=np.float64))
    bits = rgb.convert("1")
    close(decoded(tmp_path, bits, suffix), gray3(np.asarray(bits, dtype=np.float64) * 255))
    pal = rgb.quantize(16)
    colours = np.asarray(pal.getpalette(), dtype=np.float64).reshape(-1, 3)[np.asarray(pal)]
    close(decoded(tmp_path, pal, suffix), colours)
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])  # one palette entry transparent
    close(decoded(tmp_path, pal, suffix), colours)


def test_tiff_only_modes_cmyk_ycbcr_lab_and_pa(tmp_path):
    rgb = Image.fromarray(RGB)
    cmyk = rgb.convert("CMYK")
    c, m, y, k = (np.asarray(cmyk, dtype=np.float64)[..., i] for i in range(4))
    close(decoded(tmp_path, cmyk, ".tif"), np.stack([255 - np.minimum(255, ch + k) for ch in (c, m, y)], axis=2))
    ycc = rgb.convert("YCbCr")
    close(decoded(tmp_path, ycc, ".tif"), np.asarray(ycc.convert("RGB"), dtype=np.float64))
    lab = rgb.convert("LAB")
    close(decoded(tmp_path, lab, ".tif"), np.asarray(lab.convert("RGB"), dtype=np.float64))
    pa = Image.fromarray(np.dstack([RGB, ALPHA])).convert("PA")
    want = np.asarray(pa.convert("RGBA"), dtype=np.float64)[..., :3]
    close(decoded(tmp_path, pa, ".tif"), want)
    close(decoded(tmp_path, rgb, ".jpg"), np.asarray(Image.open(tmp_path / "data-RGB-jpg-3" / "x.jpg").convert("RGB"),
                                                     dtype=np.float64))
    close(decoded(tmp_path, cmyk, ".jpg"), np.asarray(Image.open(tmp_path / "data-CMYK-jpg-3" / "x.jpg").convert("RGB"),
                                                      dtype=np.float64))


def test_modes_no_file_holds_are_converted_in_memory():
    rgba = Image.fromarray(np.dstack([RGB, np.full_like(ALPHA, 255)]))
    close(np.asarray(to_8bit(rgba.convert("RGBa")).convert("RGB"), dtype=np.float64), RGB.astype(np.float64))
    gray = np.asarray(Image.fromarray(RGB).convert("L"))
    la = Image.fromarray(np.dstack([gray, np.full_like(ALPHA, 255)]), mode="LA").convert("La")
    close(np.asarray(to_8bit(la).convert("L"), dtype=np.float64), gray.astype(np.float64))
    hsv = Image.fromarray(RGB).convert("HSV")
    close(np.asarray(to_8bit(hsv).convert("RGB"), dtype=np.float64), np.asarray(hsv.convert("RGB"), dtype=np.float64))


def test_native_channels_of_high_bit_depth_images(tmp_path):
    folder = tmp_path / "d16"
    folder.mkdir()
    Image.fromarray(GRADIENT16.astype(np.uint16)).save(folder / "a.png")
    Image.fromarray(RNG.random((SIDE, SIDE)).astype(np.float32)).save(folder / "b.tif")
    for name in ("a", "b"):
        (folder / f"{name}.txt").write_text("c")
    assert native_channels(folder) == 1
    Image.fromarray(RGB).convert("CMYK").save(folder / "c.tif")
    (folder / "c.txt").write_text("c")
    assert native_channels(folder) == 3
