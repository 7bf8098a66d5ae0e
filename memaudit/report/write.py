"""Writing the report file: :func:`write_report`, and the checks before it replaces a file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from memaudit.core.errors import DataError
from memaudit.core.io import atomic_write_text, check_writable
from memaudit.core.outputs import check_clear, real
from memaudit.report.html import render_html
from memaudit.report.redact import write_redacted_report
from memaudit.report.schema import REPORT_NAME, TRAIN_KEYS, load_results, results_file_path

logger = logging.getLogger(__package__)  # "memaudit.report" as before the split: log lines still name the package

REDACTED_SUFFIX = "-redacted"


def write_report(results_path: str | os.PathLike, out: str | os.PathLike | None = None, redact: bool = False) -> Path:
    """Load ``results_path`` (results.json or its folder), render the report and write it atomically.

    ``out`` defaults to ``report.html`` beside results.json; an existing folder gets ``report.html`` inside it.
    Returns the path written.

    With ``redact=True`` on results that are not already redacted, the audit folder is left alone: a redacted copy is
    written by :func:`write_redacted_report` to the new folder ``out`` (default: ``<audit folder>-redacted`` beside the
    audit folder), and the path of its report.html is returned. A ``.html`` ``out`` is refused then (the redacted
    report needs its own folder).
    """
    file = results_file_path(results_path)
    results = load_results(file)
    folder = file.parent
    if redact and results.get("redacted") is not True:
        if out is None:
            base = folder.resolve()
            return write_redacted_report(file, base.parent / f"{base.name}{REDACTED_SUFFIX}")
        if Path(out).suffix.lower() in (".html", ".htm") and not Path(out).is_dir():
            raise DataError(f"--out {out} names an HTML file, but a redacted copy of an unredacted audit is a new "
                            "folder (results.json, grids and report.html); pass a folder for --out")
        return write_redacted_report(file, out)
    target = folder / REPORT_NAME if out is None else Path(out)
    if target.is_dir():
        target = target / REPORT_NAME
    check_writable(target, "--out", folder=False)
    if out is not None:  # report.html beside results.json is the audit's own; any other file is checked
        check_report_file(target, file, results)
    path = atomic_write_text(target, render_html(results, folder, redact=redact))
    logger.info("wrote %s", path)
    return path


def _is_report(path: Path) -> bool:
    """A report.html memaudit wrote (its first bytes name it), which a new report may replace."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"<!DOCTYPE html>") and b"<h1>memaudit audit report</h1>" in head


def check_report_file(target: Path, results_file: Path, results: dict) -> None:
    """Refuse (one line) to write a report over anything but a report memaudit wrote: the results file it reads, a
    grid or training image the audit folder holds, or any other file."""
    if real(target) == real(results_file):
        raise DataError(f"--out {target} is the results file the report reads; pass another file name, e.g. "
                        f"{target.with_name(REPORT_NAME)}")
    check_clear(target, [("an image of the audit", results_file.parent / rel) for prompt in results.get("prompts", [])
                         if isinstance(prompt, dict) for key in ("grid", *TRAIN_KEYS)
                         if isinstance(rel := prompt.get(key), str) and rel.strip()])
    if target.exists() and not _is_report(target):
        raise DataError(f"--out {target} exists and is not a report memaudit wrote; memaudit never replaces it: pass "
                        "a new file name.")
