"""The results of an audit on disk: ``results.json``, its schema, and writing and reading it with validation.

results.json, schema version 1
------------------------------
::

    {
     "kind": "memaudit.audit", "schema_version": 1, "created_utc": "2026-11-22T18:00:00Z",
     "model": str, "train": str, "prompts_source": str, "machine": str,
     "heldout": str | null (optional),
     "settings": {...free-form dict of audit settings; read when present: "tiles": int, "extraction_size": int,
                  "edge_threshold_used": float, "reference_prompts": int (how many)...},
     "seeds": {"seed": int, "image_seed": str (formula text)},
     "versions": {"memaudit": str, "torch": str, ...},
     "redacted": bool,
     "summary": {
       "n_prompts": int, "n_images": int, "generations_per_prompt": int,
       "flagged_prompts": int, "extracted_prompts": int, "extracted_training_images": int,
       "n_train": int (optional: training images searched),
       "edge_threshold": float, "min_clique": int, "delta": float,
       "feature_extractor": str, "amd": float | null,
       "reference_amd": float | null (optional: AMD of the reference prompts' generations),
       "denoising_mean": float, "denoising_threshold": float | null, "denoising_threshold_fpr": float | null,
       "denoising_flagged": int | null, "denoising_note": str | null (how the score was measured, or why not),
       "detection": null | {"auc": float, "tpr_at_1pct": float, "tpr_at_01pct": float, "n_pos": int, "n_neg": int,
                            "fpr": [float], "tpr": [float], "label_source": str},
       "quality": {...} | null, "alignment": {...} | null, "mitigation": {"kind": "rwa" | "threshold", ...} | null
                                                                                               (all optional),
       "wall_time_s": float, "sampling_time_s": float
     },
     "prompts": [ {"index": int, "prompt": str, "own_train_index": int | null, "clique_size": int, "flagged": bool,
                   "medoid_generation": int | null, "nearest_train_index": int | null,
                   "nearest_train_name": str | null, "nearest_train_distance": float | null, "extracted": bool,
                   "denoising_score": float, "amd_mean": float | null,
                   "grid": str | null (relative path of a PNG of that prompt's generations),
                   "grid_columns": int | null (optional: generations per row of that PNG),
                   "grid_withheld": bool (optional: the generations were withheld by redaction),
                   "train_image": str | null (relative path of a PNG of its nearest training image;
                                              null when redacted),
                   "train_roundtrip": str | null (optional: relative path of a PNG of that training image after
                                                  the model's VAE encode/decode; null when redacted)} ],
     "images": [ {"prompt_index": int, "generation": int, "seed": int, "min_cosine_distance": float | null,
                  "nearest_train_index": int | null, "denoising_norm": float} ],
     "reference_prompts": [ {"prompt": str, "denoising_score": float} ] (optional)
    }

Validation (the same for :func:`write_results` and :func:`load_results`): every top-level key above not marked
optional is required (``kind`` and ``schema_version`` are filled in by :func:`write_results` when absent);
``settings``, ``seeds``, ``versions`` and ``summary`` are objects, ``prompts`` and ``images`` lists of objects,
``redacted`` a boolean; ``summary`` must hold the counts ``n_prompts``, ``n_images``, ``flagged_prompts``,
``extracted_prompts`` and ``extracted_training_images``; each prompt must hold ``index``, ``prompt`` and
``flagged``. Every other key is read with a default (a missing nullable value renders as "—"), so results files
written before the optional keys existed still render. Non-finite floats are written as ``null`` so the file is
strict JSON. A file with a newer ``schema_version`` than :data:`SCHEMA_VERSION` is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memaudit.core.errors import DataError
from memaudit.core.io import atomic_write_json

logger = logging.getLogger(__package__)  # "memaudit.report" as before the split: log lines still name the package

SCHEMA_VERSION = 1
KIND = "memaudit.audit"
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"

REQUIRED_KEYS = (
    "kind", "schema_version", "created_utc", "model", "train", "prompts_source", "machine",
    "settings", "seeds", "versions", "redacted", "summary", "prompts", "images",
)
REQUIRED_SUMMARY_KEYS = ("n_prompts", "n_images", "flagged_prompts", "extracted_prompts", "extracted_training_images")
REQUIRED_PROMPT_KEYS = ("index", "prompt", "flagged")
TRAIN_KEYS = ("train_image", "train_roundtrip")  # prompt keys naming training-image files: never in a redacted report
_OBJECT_KEYS = ("settings", "seeds", "versions", "summary")
_LIST_KEYS = ("prompts", "images")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _validate(results: Any, where: str) -> None:
    """Raise :class:`DataError` naming the first missing key or wrongly typed value."""
    if not isinstance(results, dict):
        raise DataError(f"{where}: the results must be a JSON object, got {_type_name(results)}")
    if results.get("kind") != KIND:
        raise DataError(f"{where}: \"kind\" is {results.get('kind')!r}, expected {KIND!r}; not memaudit audit results")
    version = results.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{where}: \"schema_version\" must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise DataError(
            f"{where}: schema_version {version} is newer than this memaudit supports ({SCHEMA_VERSION}); "
            "upgrade memaudit to read it"
        )
    for key in REQUIRED_KEYS:
        if key not in results:
            raise DataError(f"{where}: missing required key \"{key}\"")
    for key in _OBJECT_KEYS:
        if not isinstance(results[key], dict):
            raise DataError(f"{where}: \"{key}\" must be an object, got {_type_name(results[key])}")
    for key in _LIST_KEYS:
        if not isinstance(results[key], list):
            raise DataError(f"{where}: \"{key}\" must be a list, got {_type_name(results[key])}")
    if not isinstance(results["redacted"], bool):
        raise DataError(f"{where}: \"redacted\" must be true or false, got {results['redacted']!r}")
    for key in REQUIRED_SUMMARY_KEYS:
        if key not in results["summary"]:
            raise DataError(f"{where}: missing required key \"summary.{key}\"")
    for i, prompt in enumerate(results["prompts"]):
        if not isinstance(prompt, dict):
            raise DataError(f"{where}: \"prompts[{i}]\" must be an object, got {_type_name(prompt)}")
        for key in REQUIRED_PROMPT_KEYS:
            if key not in prompt:
                raise DataError(f"{where}: missing required key \"prompts[{i}].{key}\"")
    for i, image in enumerate(results["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{where}: \"images[{i}]\" must be an object, got {_type_name(image)}")


def _jsonable(value: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays to Python, tuples to lists, paths to str, NaN/inf to None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays (and torch tensors) without importing them
        return _jsonable(value.tolist())
    return str(value)


def write_results(folder: str | os.PathLike, results: dict) -> Path:
    """Validate ``results`` and write ``folder/results.json`` atomically; return its path.

    ``kind`` and ``schema_version`` are filled in when absent. Raises :class:`DataError` naming the first missing
    key, and when results marked ``redacted`` still reference a training image.
    """
    data = _jsonable(results) if isinstance(results, Mapping) else results
    if isinstance(data, dict):
        data = {"kind": KIND, "schema_version": SCHEMA_VERSION, **data}
    _validate(data, "results")
    if data["redacted"]:
        for i, prompt in enumerate(data["prompts"]):
            for key in TRAIN_KEYS:
                if prompt.get(key) is not None:
                    raise DataError(
                        f"results: marked redacted but \"prompts[{i}].{key}\" is set; leave training images out"
                    )
    path = atomic_write_json(Path(folder) / RESULTS_NAME, data)
    logger.info("wrote %s", path)
    return path


def results_file_path(path: str | os.PathLike) -> Path:
    """The results file ``path`` names: ``path/results.json`` when it is a folder, else ``path`` itself."""
    path = Path(path)
    return path / RESULTS_NAME if path.is_dir() else path


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate ``results.json`` (``path`` is the file or its folder).

    Raises :class:`DataError` (one line) when the file is missing, unreadable, not JSON, not memaudit audit results,
    of a newer schema version, or missing a required key.
    """
    file = results_file_path(path)
    if not file.is_file():
        raise DataError(f"results file not found: {file}; pass the results.json an audit wrote, or its folder")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read results file {file}: {exc}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    _validate(results, str(file))
    return results
