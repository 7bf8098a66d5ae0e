"""The search's logs: append-only JSONL files of evaluations (the cache and the resume point), and :class:`InOrder`,
which hands results that arrive in any order on in the order they were asked for (so they are logged in that order)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from memaudit.core.errors import DataError

__all__ = ["LOG_FILE", "EvaluationLog", "InOrder"]

logger = logging.getLogger(__name__)

LOG_FILE = "evaluations.jsonl"


class EvaluationLog:
    """The append-only JSONL log of evaluations, keyed by :func:`key_of`.

    Each line is written with one ``write`` and flushed to disk, so a crash leaves at most one truncated last line,
    which is ignored (and overwritten) on the next open.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.by_key: dict[str, dict] = {}
        if self.path.is_file():
            good = 0
            with open(self.path, "rb") as f:
                data = f.read()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"search log {self.path} has a corrupt line {len(self.rows) + 1}; "
                                    "delete that line (or the log) to continue.") from e
                self.rows.append(row)
                self.by_key[row["key"]] = row
                good += len(line)
            if good < len(data):
                logger.warning("search log %s: dropping a truncated last line", self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(good)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> dict | None:
        return self.by_key.get(key)

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.by_key[row["key"]] = row


class InOrder:
    """Hands items that arrive in any order (``put(k, item)``, ``k`` in ``0..n-1``) to ``emit(k, item)`` in order of
    ``k``: each as soon as it and every item before it are in."""

    def __init__(self, n: int, emit: Callable[[int, object], None]):
        self.n, self.emit, self.waiting, self.next = n, emit, {}, 0

    def put(self, k: int, item=None) -> None:
        self.waiting[k] = item
        while self.next in self.waiting:
            k, self.next = self.next, self.next + 1
            self.emit(k, self.waiting.pop(k))

    @property
    def done(self) -> bool:
        return self.next == self.n

