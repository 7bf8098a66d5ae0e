"""Redaction: what a redacted report leaves out, and the redacted copy of an audit that can be shared.

The report is redacted when ``redact=True`` is passed or the results say ``"redacted": true``. Then no
``train_image`` or ``train_roundtrip`` file is ever embedded (only the nearest training index, name and distance
are shown), and, as a second line of defence, a grid file that is the same file as, or byte-identical to, any of
them is withheld too. A redacted audit also withholds the generations of *extracted* prompts (``grid`` null,
``grid_withheld`` true): the audit matched them to a training image, so they are one. The generations of prompts
that were flagged but not extracted are still shown.

Redacting an unredacted audit never rewrites it in place: :func:`write_redacted_report` writes a new folder (a
redacted ``results.json``, the grids of the non-extracted prompts, and ``report.html``) that can be shared, and
``write_report(path, redact=True)`` (:mod:`memaudit.report.write`) on unredacted results does exactly that, to
``<audit folder>-redacted`` beside the audit folder unless ``out`` names the new folder. On results that are already
redacted it just rebuilds the report, as for unredacted ones. ``memaudit report RESULTS --redact [--out NEW_FOLDER]``
is this call.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

from memaudit.core.digests import sha256_file
from memaudit.core.errors import DataError
from memaudit.core.io import atomic_write_text
from memaudit.core.outputs import check_output, output_directory, real
from memaudit.report.html import render_html
from memaudit.report.images import training_files
from memaudit.report.schema import REPORT_NAME, TRAIN_KEYS, load_results, results_file_path, write_results

logger = logging.getLogger(__package__)  # "memaudit.report" as before the split: log lines still name the package


def redact_results(results: dict) -> dict:
    """A redacted deep copy of ``results``: ``redacted`` true, every prompt's ``train_image`` and ``train_roundtrip``
    null, and the generations of extracted prompts withheld (``grid`` null, ``grid_withheld`` true)."""
    out = copy.deepcopy(results)
    out["redacted"] = True
    for prompt in out.get("prompts") or []:
        if not isinstance(prompt, dict):
            continue
        for key in TRAIN_KEYS:
            if key in prompt:
                prompt[key] = None
        if prompt.get("extracted"):
            prompt["grid"] = None
            prompt["grid_withheld"] = True
    return out


def write_redacted_report(results_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a redacted copy of an audit to the new folder ``out_dir`` and return the path of its report.html.

    ``out_dir`` gets (atomically, all or nothing) a redacted results.json (:func:`redact_results`), copies of the
    grid PNGs of the prompts that were not extracted (same relative paths; a grid that is, or is byte-identical to,
    a file named as a training image is withheld instead), and a redacted report.html rendered from that folder.
    No training-image file is ever copied. The audit folder is not modified.

    Raises :class:`DataError` when ``out_dir`` is the audit folder, inside it or contains it, is a file, or exists,
    is not empty and is not a redacted memaudit copy (no redacted results.json in it).
    """
    file = results_file_path(results_path)
    results = load_results(file)
    folder = file.parent.resolve()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise DataError(f"redacted copy folder {out_dir} is a file; pass a new folder")
    if real(out_dir) == folder or real(out_dir).is_relative_to(folder):
        raise DataError(f"redacted copy folder {out_dir} is inside the audit folder {folder}; pass a new folder "
                        "outside it (e.g. next to it)")
    if folder.is_relative_to(real(out_dir)):
        raise DataError(f"redacted copy folder {out_dir} contains the audit folder {folder}; pass a new folder")
    out = check_output(out_dir, "report --redact", [("the audit folder", folder)])
    redacted = redact_results(results)
    forbidden_paths, forbidden_hashes = training_files(results, folder, max_bytes=None)
    copies: dict[str, Path] = {}
    for prompt in redacted["prompts"]:
        rel = prompt.get("grid")
        if not isinstance(rel, str) or not rel.strip():
            continue
        p = Path(rel)
        full = None if p.is_absolute() else (folder / p).resolve()
        if full is None or not full.is_relative_to(folder):
            logger.warning("grid path outside the audit folder, not copied: %s", rel)
            prompt["grid"] = None
            continue
        if not full.is_file():
            continue  # kept: the report notes the missing file, as the audit's own report does
        if full in forbidden_paths or sha256_file(full) in forbidden_hashes:
            logger.warning("grid %s is a training image; withheld from the redacted copy", rel)
            prompt["grid"] = None
            prompt["grid_withheld"] = True
            continue
        copies[full.relative_to(folder).as_posix()] = full
    with output_directory(out, "report --redact") as tmp:
        for rel, src in copies.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        write_results(tmp, redacted)
        atomic_write_text(tmp / REPORT_NAME, render_html(redacted, tmp, redact=True))
    logger.info("wrote a redacted copy of %s to %s", folder, out)
    return out / REPORT_NAME
