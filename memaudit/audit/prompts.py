"""Prompt files: a ``.txt`` (one prompt per line), ``.csv`` or ``.jsonl``, read (and any mistake in them stopped
with one line) before the model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from memaudit.core.errors import DataError

__all__ = ["read_prompts"]

def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` (one per line), ``.csv`` or ``.jsonl`` (a ``prompt`` or ``caption`` field)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompts file {path} is a folder; pass a .txt (one prompt per line), .csv or .jsonl file.")
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist; pass a .txt (one prompt per line), .csv or .jsonl file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"prompts file {path} is not UTF-8 text; save it as UTF-8.") from e
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names: an unquoted comma cut the prompt
                raise DataError(f"prompts file {path} line {reader.line_num} has more fields than its header; a prompt "
                                'that contains a comma must be quoted, e.g. "a red car, parked".')
            rows.append(row)
        key = next((k for k in ("prompt", "caption") if rows and k in rows[0]), None)
        if rows and key is None:
            raise DataError(f"prompts file {path} has no 'prompt' or 'caption' column (found: {', '.join(rows[0])}).")
        prompts = [r[key].strip() for r in rows] if rows else []
    elif path.suffix.lower() == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"prompts file {path} line {n} is not valid JSON ({e.msg}).") from e
            value = obj.get("prompt", obj.get("caption")) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise DataError(f"prompts file {path} line {n} has no 'prompt' or 'caption' string.")
            prompts.append(value.strip())
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {path} has no prompts; put one prompt per line.")
    return prompts
