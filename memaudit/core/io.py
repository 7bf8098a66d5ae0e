"""Atomic writes: a result or checkpoint is either complete on disk or absent, never half-written."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memaudit.core.errors import ConfigError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on error it is removed.

    A previous folder at ``path`` stays untouched until the new one is complete, and is then swapped out with two
    renames in the same parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{tag}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


CACHE_ENV = "MEMAUDIT_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where memaudit keeps what it can rebuild (training-feature indexes): ``$MEMAUDIT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/memaudit``, else ``~/.cache/memaudit``. Never inside an output folder: a feature index of
    pixel features *is* the training images, and output folders are what users share."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memaudit"


def check_writable(path: str | os.PathLike, what: str, *, folder: bool = True) -> Path:
    """Check, leaving nothing behind, that ``path`` (a folder, or a file with ``folder=False``) can be created or
    replaced: it is written as a temporary sibling renamed into place, so the nearest existing ancestor of its parent
    must be a writable folder. Raises a one-line :class:`~memaudit.core.errors.ConfigError` naming ``what`` (e.g.
    ``--out``) otherwise."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; pass a folder.")
    if not folder and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; pass a file name.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {parent} is a file.")
    try:
        test = parent / f".memaudit-write-test-{uuid.uuid4().hex[:8]}"
        test.mkdir()
        test.rmdir()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be written ({e.strerror or e}: {parent}); pass a folder you can "
                          "write to.") from None
    return path
