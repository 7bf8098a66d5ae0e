"""Image-caption datasets: loading from disk, building from arrays, splitting.

A dataset is held fully in memory as one float32 tensor ``[N, C, H, W]`` with values in ``[-1, 1]`` (the range
Stable Diffusion's VAE expects), plus a caption and a unique name per image.

:func:`load_dataset` reads one of three on-disk layouts, checked in this order:

1. ``path`` is a ``.csv`` or ``.jsonl`` captions file; image paths in it are relative to its folder.
2. ``path`` is a folder holding ``captions.csv`` or ``captions.jsonl`` (or the file named by ``captions_file``).
3. ``path`` is a folder of images, each with a same-named ``.txt`` caption (``a.png`` + ``a.txt``).

A CSV captions file needs a header row with the columns ``file`` and ``caption`` (others are ignored); a JSONL file
holds one object per line with the keys ``file`` and ``caption``. Every user mistake raises
:class:`~memaudit.errors.DataError` with a one-line message naming the offending file or line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import operator
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from memaudit.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "ImageCaptionDataset", "from_arrays", "load_dataset", "native_channels"]

#: File extensions (lower case) treated as images in a folder of images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_CAPTION_FILES = ("captions.csv", "captions.jsonl")
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


@dataclass(eq=False, repr=False)
class ImageCaptionDataset:
    """Images with captions, held in memory.

    Attributes:
        images: float32 tensor ``[N, C, H, W]`` with values in ``[-1, 1]``.
        captions: one caption per image.
        names: one unique name per image (the file path as written in the captions file, or an id).
        source: where the data came from (a path), for reports.
    """

    images: torch.Tensor
    captions: list[str]
    names: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            shape = tuple(self.images.shape) if hasattr(self.images, "shape") else type(self.images).__name__
            raise DataError(f"Dataset images must be a tensor of shape [N, C, H, W]; got {shape}.")
        self.captions = list(self.captions)
        self.names = [str(n) for n in self.names]
        n = self.images.shape[0]
        if len(self.captions) != n or len(self.names) != n:
            raise DataError(
                f"Dataset from {self.source or 'arrays'} has {n} images, {len(self.captions)} captions and "
                f"{len(self.names)} names; pass one caption and one name per image."
            )
        bad = next((i for i, c in enumerate(self.captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise DataError(
                f"Caption {bad} of the dataset from {self.source or 'arrays'} is a "
                f"{type(self.captions[bad]).__name__}, not a string; pass captions as strings."
            )
        dup = _first_duplicate(self.names)
        if dup is not None:
            raise DataError(
                f"Dataset from {self.source or 'arrays'} has the name {dup!r} more than once; names must be unique."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """Return ``(image [C, H, W], caption)`` of item ``i`` (negative indices count from the end)."""
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} images")
        return self.images[i], self.captions[i]

    def __repr__(self) -> str:
        return (
            f"ImageCaptionDataset(n={len(self)}, channels={self.channels}, "
            f"size={tuple(self.images.shape[2:])}, source={self.source!r})"
        )

    @property
    def channels(self) -> int:
        """Number of channels C (1 for grayscale, 3 for RGB)."""
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        """Image height H (images loaded from disk are square)."""
        return int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageCaptionDataset:
        """Return a new dataset with the items at ``indices``, in that order."""
        idx = [operator.index(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist()]
        n = len(self)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise DataError(f"Subset index {bad[0]} is out of range for a dataset of {n} images; use 0..{n - 1}.")
        idx = [i % n for i in idx] if n else idx
        index = torch.tensor(idx, dtype=torch.long)
        return ImageCaptionDataset(
            images=self.images.index_select(0, index),
            captions=[self.captions[i] for i in idx],
            names=[self.names[i] for i in idx],
            source=self.source,
        )

    def split(self, seed: int = 0, val: float = 0.1, test: float = 0.1) -> dict[str, ImageCaptionDataset]:
        """Split into disjoint ``"train"``, ``"val"`` and ``"test"`` parts that together cover every item.

        The parts get ``round(val * N)`` and ``round(test * N)`` items, drawn with
        ``numpy.random.default_rng(seed).permutation``; the rest is ``"train"``. Items keep their original order
        within each part. The same seed always gives the same split.
        """
        if val < 0 or test < 0 or val + test >= 1:
            raise DataError(
                f"Split fractions val={val} and test={test} are invalid; each must be >= 0 and their sum below 1."
            )
        n = len(self)
        n_val, n_test = round(float(val) * n), round(float(test) * n)
        perm = np.random.default_rng(seed).permutation(n)
        test_idx = np.sort(perm[:n_test])
        val_idx = np.sort(perm[n_test : n_test + n_val])
        train_idx = np.sort(perm[n_test + n_val :])
        return {"train": self.subset(train_idx), "val": self.subset(val_idx), "test": self.subset(test_idx)}

    def to_pil(self, i: int) -> Image.Image:
        """Return image ``i`` as an 8-bit PIL image (mode ``"L"`` for 1 channel, ``"RGB"`` for 3)."""
        x, _ = self[i]
        if x.shape[0] not in (1, 3):
            raise DataError(f"Cannot convert an image with {x.shape[0]} channels to PIL; expected 1 or 3.")
        u8 = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if u8.shape[0] == 1:
            return Image.fromarray(u8[0].numpy(), mode="L")
        return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


# --------------------------------------------------------------------------------------------------------------
# From arrays
# --------------------------------------------------------------------------------------------------------------


def from_arrays(
    images: np.ndarray | torch.Tensor,
    captions: Sequence[str],
    names: Sequence[str] | None = None,
    source: str = "arrays",
) -> ImageCaptionDataset:
    """Build a dataset from in-memory images.

    Args:
        images: numpy array or tensor shaped ``[N, H, W]`` (grayscale), ``[N, C, H, W]`` or ``[N, H, W, C]``
            with C in {1, 3} (channels-first is assumed when both readings fit). Integer arrays hold 0..255,
            float arrays hold values in ``[0, 1]``.
        captions: one caption per image.
        names: one unique name per image; defaults to ``"0"``, ``"1"``, ...
        source: description of where the arrays came from, for reports.
    """
    t = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4:
        if t.shape[1] in (1, 3):
            pass
        elif t.shape[3] in (1, 3):
            t = t.permute(0, 3, 1, 2)
        else:
            raise DataError(
                f"Images from {source} have shape {tuple(t.shape)}; expected [N, C, H, W] or [N, H, W, C] with "
                "1 or 3 channels."
            )
    else:
        raise DataError(
            f"Images from {source} have shape {tuple(t.shape)}; expected [N, H, W], [N, C, H, W] or [N, H, W, C]."
        )

    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"Images from {source} have dtype {t.dtype}; pass uint8 (0..255) or float (0..1).")
    if t.is_floating_point():
        f = t.to(torch.float32)
        if f.numel() and (not torch.isfinite(f).all() or f.min() < 0 or f.max() > 1):
            raise DataError(
                f"Float images from {source} must hold values in [0, 1] (got {f.min().item():g}.."
                f"{f.max().item():g}); scale them or pass uint8 0..255."
            )
        out = f * 2.0 - 1.0
    else:
        if t.numel() and (t.min() < 0 or t.max() > 255):
            raise DataError(
                f"Integer images from {source} must hold values 0..255 (got {t.min().item()}..{t.max().item()}); "
                "pass uint8 or float 0..1."
            )
        out = t.to(torch.float32) / 127.5 - 1.0

    n = out.shape[0]
    captions = list(captions)
    if len(captions) != n:
        raise DataError(f"Got {n} images but {len(captions)} captions from {source}; pass one caption per image.")
    names_list = [str(i) for i in range(n)] if names is None else [str(x) for x in names]
    if len(names_list) != n:
        raise DataError(f"Got {n} images but {len(names_list)} names from {source}; pass one name per image.")
    return ImageCaptionDataset(images=out.contiguous(), captions=captions, names=names_list, source=source)


# --------------------------------------------------------------------------------------------------------------
# From disk
# --------------------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | os.PathLike[str],
    resolution: int,
    channels: int,
    *,
    captions_file: str | None = None,
) -> ImageCaptionDataset:
    """Load images and captions from disk, resized and center-cropped to ``resolution`` x ``resolution``.

    Args:
        path: a ``.csv``/``.jsonl`` captions file, a folder holding one, or a folder of images with ``.txt``
            captions (see the module docstring).
        resolution: side length of the square output images (>= 1).
        channels: 1 (grayscale, PIL mode ``"L"``) or 3 (``"RGB"``).
        captions_file: captions file to use when ``path`` is a folder, relative to it or absolute.

    Returns:
        The dataset, images float32 ``[N, channels, resolution, resolution]`` in ``[-1, 1]``.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}; pass e.g. resolution=512.")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    resolution = int(resolution)
    paths, files, captions, source = _resolve_files(path, captions_file)

    images = torch.empty((len(paths), channels, resolution, resolution), dtype=torch.float32)
    mode = "L" if channels == 1 else "RGB"
    with _strict_image_loading():
        for i, p in enumerate(paths):
            images[i] = _load_image(p, mode, resolution)
    logger.info("Loaded %d images (%s, %dx%d) from %s", len(paths), mode, resolution, resolution, source)
    return ImageCaptionDataset(images=images, captions=captions, names=files, source=str(source))


def _resolve_files(path: str | os.PathLike[str], captions_file: str | None) -> tuple[list[Path], list[str], list[str], Path]:
    """Image paths, names as written, captions and the source file/folder of a dataset on disk (validated)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"Dataset path {root} does not exist; pass a folder of images or a .csv/.jsonl captions file.")

    if root.is_file():
        if captions_file is not None:
            raise DataError(
                f"Dataset path {root} is a file, so captions_file={captions_file!r} cannot apply; pass the folder "
                "as the path, or drop captions_file."
            )
        if root.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(
                f"Dataset path {root} is not a .csv or .jsonl captions file; pass such a file or a folder of images."
            )
        files, captions = _read_captions_file(root)
        base, source = root.parent, root
    elif root.is_dir():
        cap = _find_captions_file(root, captions_file)
        if cap is not None:
            files, captions = _read_captions_file(cap)
            base, source = cap.parent, cap
        else:
            files, captions = _read_image_folder(root)
            base, source = root, root
    else:
        raise DataError(f"Dataset path {root} is neither a file nor a folder; pass a folder or a captions file.")

    paths = [base / f for f in files]
    missing = [f for f, p in zip(files, paths) if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image file(s) listed in {source} are missing: {_list_some(missing)}; fix the paths "
            f"(relative to {base}) or remove those entries."
        )

    return paths, files, captions, source


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def native_channels(path: str | os.PathLike[str], *, captions_file: str | None = None, sample: int = 16) -> int:
    """1 if the dataset's images are grayscale, 3 if they are colour, judged from (up to) ``sample`` files.

    Lets a caller notice a training set whose channels differ from the model's before silently converting it.
    """
    paths, _, _, _ = _resolve_files(path, captions_file)
    modes = set()
    with _strict_image_loading():
        for p in paths[:sample]:
            try:
                with Image.open(p) as im:
                    modes.add(im.mode)
            except Exception as e:
                raise DataError(f"Image {p} is unreadable ({type(e).__name__}: {e}); replace or remove it.") from e
    return 1 if modes and modes <= _GRAY_MODES else 3


def _find_captions_file(root: Path, captions_file: str | None) -> Path | None:
    """Return the captions file to use for folder ``root``, or None when it has none."""
    if captions_file is not None:
        cap = Path(captions_file).expanduser()
        cap = cap if cap.is_absolute() else root / cap
        if not cap.is_file():
            raise DataError(f"Captions file {cap} does not exist; check captions_file (relative to {root}).")
        if cap.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"Captions file {cap} must end in .csv or .jsonl; rename it or pass another file.")
        return cap
    found = [root / name for name in _CAPTION_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"Folder {root} holds both captions.csv and captions.jsonl; pass captions_file to say which to use."
        )
    return found[0] if found else None


def _read_captions_file(path: Path) -> tuple[list[str], list[str]]:
    """Read ``(files, captions)`` from a .csv or .jsonl captions file."""
    try:
        if path.suffix.lower() == ".csv":
            files, captions = _read_csv(path)
        else:
            files, captions = _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"Captions file {path} is not valid UTF-8 ({e.reason}); save it as UTF-8.") from e
    except OSError as e:
        raise DataError(f"Cannot read captions file {path}: {e.strerror or e}; check its permissions.") from e
    if not files:
        raise DataError(f"Captions file {path} has no entries; add one entry per image with 'file' and 'caption'.")
    seen: dict[str, str] = {}
    for f in files:
        key = os.path.normpath(f)
        if key in seen:
            raise DataError(f"Captions file {path} lists the image {f!r} more than once; keep one entry per image.")
        seen[key] = f
    return files, captions


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    """Parse a CSV captions file with a header row holding ``file`` and ``caption``."""
    files: list[str] = []
    captions: list[str] = []
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)  # skip blank lines before the header
        if header is None:
            raise DataError(f"Captions file {path} is empty; add a header row 'file,caption' and one row per image.")
        columns = [h.strip() for h in header]
        lacking = [c for c in ("file", "caption") if c not in columns]
        if lacking:
            raise DataError(
                f"Captions file {path} lacks the column(s) {', '.join(lacking)} (found: "
                f"{', '.join(repr(c) for c in columns)}); its header row must name 'file' and 'caption'."
            )
        i_file, i_cap = columns.index("file"), columns.index("caption")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) > len(columns):
                raise DataError(
                    f"Captions file {path} line {line} has {len(row)} fields but the header has {len(columns)}; "
                    'a caption that contains a comma must be quoted, e.g. a.png,"a red car, parked".'
                )
            file = row[i_file].strip() if i_file < len(row) else ""
            caption = row[i_cap].strip() if i_cap < len(row) else ""
            if not file:
                raise DataError(f"Captions file {path} has an empty 'file' on line {line}; fill it in or drop the row.")
            if not caption:
                raise DataError(
                    f"Captions file {path} has an empty caption on line {line} (file {file}); write a caption "
                    "or drop the row."
                )
            files.append(file)
            captions.append(caption)
    return files, captions


def _read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """Parse a JSONL captions file: one ``{"file": ..., "caption": ...}`` object per line."""
    files: list[str] = []
    captions: list[str] = []
    with path.open("r", encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"Captions file {path} line {line_no} is not valid JSON ({e.msg}); write one JSON object per line."
                ) from e
            if not isinstance(obj, dict):
                raise DataError(
                    f"Captions file {path} line {line_no} is a JSON {type(obj).__name__}, not an object; write "
                    '{"file": ..., "caption": ...}.'
                )
            lacking = [k for k in ("file", "caption") if k not in obj]
            if lacking:
                raise DataError(
                    f"Captions file {path} line {line_no} lacks the key(s) {', '.join(lacking)} (found: "
                    f"{', '.join(repr(k) for k in obj) or 'none'}); each line needs 'file' and 'caption'."
                )
            file, caption = obj["file"], obj["caption"]
            if not isinstance(file, str) or not file.strip():
                raise DataError(
                    f"Captions file {path} line {line_no} has an empty or non-string 'file'; give the image path."
                )
            if not isinstance(caption, str):
                raise DataError(
                    f"Captions file {path} line {line_no} has a non-string caption ({type(caption).__name__}); "
                    "write it as a JSON string."
                )
            if not caption.strip():
                raise DataError(
                    f"Captions file {path} has an empty caption on line {line_no} (file {file.strip()}); write a "
                    "caption or drop the line."
                )
            files.append(file.strip())
            captions.append(caption.strip())
    return files, captions


def _read_image_folder(root: Path) -> tuple[list[str], list[str]]:
    """Read ``(files, captions)`` from a folder of images with same-named ``.txt`` captions (not recursive)."""
    images = sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise DataError(
            f"Folder {root} has no captions.csv, captions.jsonl or images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images with .txt captions or a captions file."
        )
    uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise DataError(
            f"{len(uncaptioned)} image(s) in {root} have no .txt caption: {_list_some(uncaptioned)}; add a "
            "same-named .txt file (a.png + a.txt) for each, or use a captions.csv."
        )
    captions: list[str] = []
    for p in images:
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"Caption file {txt} is not valid UTF-8 ({e.reason}); save it as UTF-8.") from e
        except OSError as e:
            raise DataError(f"Cannot read caption file {txt}: {e.strerror or e}; check its permissions.") from e
        if not caption:
            raise DataError(f"Caption file {txt} is empty; write a caption for {p.name}.")
        captions.append(caption)
    return [p.name for p in images], captions


@contextlib.contextmanager
def _strict_image_loading() -> Iterator[None]:
    """Make PIL refuse truncated images for the duration of the block, then restore the previous setting."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _load_image(path: Path, mode: str, resolution: int) -> torch.Tensor:
    """Load one image as float32 ``[C, resolution, resolution]`` in ``[-1, 1]`` (shorter side resized, centre crop)."""
    try:
        with Image.open(path) as im:
            im.load()
            img = im.convert(mode)
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


def _first_duplicate(items: Sequence[str]) -> str | None:
    """Return the first item that occurs twice, or None."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _list_some(items: Sequence[str]) -> str:
    """Join up to five items, saying how many more there are."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def dataset_for_target(train, target, convert_channels: bool = False) -> tuple[ImageCaptionDataset, str]:
    """``train`` (a dataset, or a folder/captions file) checked against or loaded for ``target``'s images.

    Returns the dataset and a description of its source. A folder whose images have another channel count than the
    model's is an error unless ``convert_channels``.
    """
    if isinstance(train, ImageCaptionDataset):
        if train.channels != target.image_channels:
            raise DataError(f"the training set has {train.channels}-channel images but the model generates "
                            f"{target.image_channels}-channel images; convert the training images first.")
        if train.resolution != target.resolution:
            raise DataError(f"the training images are {train.resolution} px but the model generates "
                            f"{target.resolution} px; load them at the model's resolution.")
        return train, train.source or "in-memory dataset"
    channels = native_channels(train)
    if channels != target.image_channels and not convert_channels:
        kind = {1: "grayscale", 3: "colour"}
        raise DataError(f"the training images in {train} are {kind[channels]} ({channels} channel(s)) but the model "
                        f"generates {kind[target.image_channels]} images; pass --convert-channels to convert them.")
    return load_dataset(train, target.resolution, target.image_channels), str(train)
