"""The image files of an audit folder as the report embeds them: base64 ``data:`` URIs with their pixel sizes.

Image paths are only read inside the results folder: an absolute path, or one that escapes the folder (``..``,
symbolic links), is shown as a note and never read. In a redacted report a file named as a training image
(:func:`training_files`), or byte-identical to one, is withheld with a note instead.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import struct
from pathlib import Path
from typing import Any

from memaudit.core.digests import sha256_file
from memaudit.report.schema import TRAIN_KEYS

logger = logging.getLogger(__package__)  # "memaudit.report" as before the split: log lines still name the package

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one embedded image; larger files are noted, not embedded
MAX_TILE_CSS_PX = 128  # a generation tile (and the training images beside it) is shown at most this wide

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of PNG bytes from the IHDR chunk (bytes 16..24), or None when not a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if width > 0 and height > 0 else None


class Image:
    """One embedded image: its data URI and pixel size, or the note saying why it is not shown."""

    __slots__ = ("uri", "note", "size")

    def __init__(self, uri: str | None, note: str = "", size: tuple[int, int] | None = None):
        self.uri, self.note, self.size = uri, note, size


class Images:
    """Reads image files under the results folder into data URIs, refusing anything a redacted report must not show."""

    def __init__(self, folder: Path, results: dict, redact: bool):
        self.folder = folder.resolve()
        self.redact = redact
        self._forbidden_paths: set[Path] | None = None
        self._forbidden_hashes: set[str] = set()
        self._results = results

    def _resolve(self, rel: str) -> Path | None:
        p = Path(rel)
        if p.is_absolute():
            return None
        full = (self.folder / p).resolve()
        return full if full.is_relative_to(self.folder) else None

    def _load_forbidden(self) -> None:
        """Paths and content hashes of every training image the results reference (read only to compare)."""
        self._forbidden_paths, self._forbidden_hashes = training_files(self._results, self.folder)

    def image(self, rel: Any) -> Image:
        """The image at a relative path from results.json, or a note on why it is not shown."""
        if not isinstance(rel, str) or not rel.strip():
            return Image(None, "(no image)")
        full = self._resolve(rel)
        if full is None:
            logger.warning("image path outside the results folder, not embedded: %s", rel)
            return Image(None, f"(image path outside the results folder: {rel})")
        if not full.is_file():
            logger.warning("image file missing: %s", full)
            return Image(None, f"(image file missing: {rel})")
        if self.redact:
            if self._forbidden_paths is None:
                self._load_forbidden()
            if full in self._forbidden_paths:
                return Image(None, f"(withheld by redaction: {rel} is a training image)")
        try:
            size = full.stat().st_size
            if size > MAX_IMAGE_BYTES:
                return Image(None, f"(image file too large to embed: {rel}, {size} bytes)")
            data = full.read_bytes()
        except OSError as exc:
            logger.warning("cannot read image %s: %s", full, exc)
            return Image(None, f"(image file unreadable: {rel})")
        if self.redact and hashlib.sha256(data).hexdigest() in self._forbidden_hashes:
            return Image(None, f"(withheld by redaction: {rel} is identical to a training image)")
        if data.startswith(_PNG_SIGNATURE):
            mime = "image/png"
        elif data.startswith(_JPEG_SIGNATURE):
            mime = "image/jpeg"
        else:
            return Image(None, f"(not a PNG image: {rel})")
        return Image(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", "", png_size(data))


def training_files(results: dict, folder: Path, max_bytes: int | None = MAX_IMAGE_BYTES) -> tuple[set[Path], set[str]]:
    """Resolved paths and SHA-256 hashes of every file a prompt names as a training image (``train_image``,
    ``train_roundtrip``); paths are resolved against ``folder`` even when they escape it, so nothing slips through."""
    paths: set[Path] = set()
    hashes: set[str] = set()
    for prompt in results.get("prompts") or []:
        for key in TRAIN_KEYS:
            rel = prompt.get(key) if isinstance(prompt, dict) else None
            if not isinstance(rel, str) or not rel:
                continue
            p = Path(rel)
            full = (p if p.is_absolute() else folder / p).resolve()
            paths.add(full)
            try:
                if full.is_file() and (max_bytes is None or full.stat().st_size <= max_bytes):
                    hashes.add(sha256_file(full))
            except OSError:
                pass
    return paths, hashes

