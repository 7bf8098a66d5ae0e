"""A saved index on disk: ``index-<key>.faiss`` and ``index-<key>.json``, checksummed and sealed.

The index file is written first and the JSON last, so a complete pair on disk is always consistent. The JSON
metadata record the faiss file's size and SHA-256 and carry a seal of their own
(:func:`memaudit.core.digests.with_seal`); a file that does not match is reported (a warning naming it) and the
reader answers ``None`` (the caller rebuilds it), never a damaged index.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss

from memaudit.core.digests import seal_ok, sha256_file, with_seal
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["INDEX_FORMAT", "check_key", "read_checked", "write_checked"]

INDEX_FORMAT = 2  # 2: the metadata record the faiss file's size and SHA-256, and are sealed
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_key(key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` can name the files (letters, digits, '.', '_', '-')."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ConfigError(f"index key {key!r} must be letters, digits, '.', '_' or '-' (it names a file)")


def write_checked(cpu_index: Any, folder: str | os.PathLike, key: str, metadata: dict[str, Any]) -> Path:
    """Write the faiss index ``cpu_index`` to ``folder/index-<key>.faiss`` and ``metadata`` (with the file's size and
    SHA-256, sealed) to ``folder/index-<key>.json``, each atomically; returns the index path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"index-{key}.faiss"
    tmp = folder / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        faiss.write_index(cpu_index, str(tmp))
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    atomic_write_json(folder / f"index-{key}.json", with_seal({**metadata, "bytes": size, "sha256": digest}))
    logger.info("saved neighbour index to %s", path)
    return path


def read_checked(folder: str | os.PathLike, key: str, metrics: Sequence[str]) -> tuple[Any, dict[str, Any]] | None:
    """``(cpu_index, metadata)`` of the index saved under ``key`` in ``folder``, or ``None`` if it is absent,
    unreadable or its metadata do not match (another key, format, a metric not in ``metrics``, dimension or size).

    The index file is hashed before faiss reads it: a file whose size or SHA-256 is not the one its metadata record,
    or metadata whose seal does not match, is logged as a warning naming the file and ``None`` is returned."""
    check_key(key)
    folder = Path(folder)
    path, meta_path = folder / f"index-{key}.faiss", folder / f"index-{key}.json"
    if not path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            logger.info("neighbour index metadata %s are of another format; rebuilding", meta_path)
            return None
        if not seal_ok(meta):
            logger.warning("neighbour index metadata %s are damaged (their seal does not match); rebuilding the "
                           "index", meta_path)
            return None
        if meta.get("key") != key or meta.get("metric") not in metrics or meta.get("kind") not in ("exact", "ivf"):
            logger.info("neighbour index metadata %s does not match key %s; rebuilding", meta_path, key)
            return None
        size = path.stat().st_size
        if size != meta.get("bytes") or sha256_file(path) != meta.get("sha256"):
            logger.warning("saved neighbour index %s does not match its checksum (%d bytes, %s recorded); it is "
                           "damaged: rebuilding it", path, meta.get("bytes"), meta.get("sha256"))
            return None
        cpu_index = faiss.read_index(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        logger.warning("cannot read the saved neighbour index %s (%s); rebuilding it", path, e)
        return None
    if int(cpu_index.ntotal) != meta.get("ntotal") or int(cpu_index.d) != meta.get("dim"):
        logger.warning("saved neighbour index %s does not match its metadata; rebuilding it", path)
        return None
    return cpu_index, meta
