"""Readers of datasets on disk: a captions file (CSV or JSONL), or a folder of images with ``.txt`` captions.

:func:`load_dataset` reads one of three on-disk layouts, checked in this order:

1. ``path`` is a ``.csv`` or ``.jsonl`` captions file; image paths in it are relative to its folder.
2. ``path`` is a folder holding ``captions.csv`` or ``captions.jsonl`` (or the file named by ``captions_file``).
3. ``path`` is a folder of images, each with a same-named ``.txt`` caption (``a.png`` + ``a.txt``).

A CSV captions file needs a header row with the columns ``file`` and ``caption`` (others are ignored); a JSONL file
holds one object per line with the keys ``file`` and ``caption``. Every user mistake raises
:class:`~memaudit.core.errors.DataError` with a one-line message naming the offending file or line: the captions and
every image's header are checked when the dataset is loaded, before anything is written; a file that fails only at
full decode is named when it is read, and the reader stops there.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from memaudit.core.errors import DataError
from memaudit.data.dataset import ImageCaptionDataset
from memaudit.data.decode import strict_image_loading

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "load_dataset", "resolve_files"]

#: File extensions (lower case) treated as images in a folder of images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

_CAPTION_FILES = ("captions.csv", "captions.jsonl")
_MAX_LISTED = 5


def load_dataset(
    path: str | os.PathLike[str],
    resolution: int,
    channels: int,
    *,
    captions_file: str | None = None,
) -> ImageCaptionDataset:
    """Index images and captions on disk, to be read resized and center-cropped to ``resolution`` x ``resolution``.

    The captions are parsed and every image's header is read (its format and size) now; no pixel is decoded until
    the dataset is read (:meth:`ImageCaptionDataset.batches`).

    Args:
        path: a ``.csv``/``.jsonl`` captions file, a folder holding one, or a folder of images with ``.txt``
            captions (see the module docstring).
        resolution: side length of the square images as read (>= 1).
        channels: 1 (grayscale, PIL mode ``"L"``) or 3 (``"RGB"``).
        captions_file: captions file to use when ``path`` is a folder, relative to it or absolute.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}; pass e.g. resolution=512.")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    paths, files, captions, source = resolve_files(path, captions_file)
    with strict_image_loading():
        for p in paths:
            _check_header(p)
    logger.info("Indexed %d images from %s (read at %dx%d, %d channel(s))", len(paths), source, resolution,
                resolution, channels)
    return ImageCaptionDataset(captions, files, str(source), files=paths, resolution=int(resolution),
                               channels=channels)


def _check_header(path: Path) -> None:
    """Open ``path`` as an image and read its header (format, size), without decoding its pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    # PIL signals broken files with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # DecompressionBombError, struct.error...); any of them means the file cannot be used.
    except Exception as e:
        raise DataError(f"Image {path} is unreadable ({type(e).__name__}: {e}); replace or remove it.") from e
    if w < 1 or h < 1:
        raise DataError(f"Image {path} has size {w}x{h}; replace or remove it.")


def resolve_files(path: str | os.PathLike[str], captions_file: str | None) -> tuple[list[Path], list[str], list[str], Path]:
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


def _list_some(items: Sequence[str]) -> str:
    """Join up to five items, saying how many more there are."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} (and {rest} more)" if rest > 0 else shown
