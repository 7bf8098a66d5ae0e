"""Audit results on disk (``results.json``) and the self-contained HTML report built from them.

An audit writes an output folder holding ``results.json`` and the PNG files it references by relative path
(one grid of generations per prompt, and, unless redacted, the nearest training image of each prompt).
:func:`render_html` / :func:`write_report` rebuild a single HTML file from that folder alone: every image is
embedded as a base64 ``data:`` URI, the page needs no network, no external file and no JavaScript (a
Content-Security-Policy in the page forbids all three).

results.json, schema version 1
------------------------------
::

    {
     "kind": "memaudit.audit", "schema_version": 1, "created_utc": "2026-11-22T18:00:00Z",
     "model": str, "train": str, "prompts_source": str, "machine": str,
     "settings": {...free-form dict of audit settings...},
     "seeds": {"seed": int, "image_seed": str (formula text)},
     "versions": {"memaudit": str, "torch": str, ...},
     "redacted": bool,
     "summary": {
       "n_prompts": int, "n_images": int, "generations_per_prompt": int,
       "flagged_prompts": int, "extracted_prompts": int, "extracted_training_images": int,
       "edge_threshold": float, "min_clique": int, "delta": float,
       "feature_extractor": str, "amd": float | null,
       "denoising_mean": float, "denoising_threshold": float | null, "denoising_threshold_fpr": float | null,
       "denoising_flagged": int | null,
       "detection": null | {"auc": float, "tpr_at_1pct": float, "tpr_at_01pct": float, "n_pos": int, "n_neg": int,
                            "fpr": [float], "tpr": [float], "label_source": str},
       "wall_time_s": float, "sampling_time_s": float
     },
     "prompts": [ {"index": int, "prompt": str, "own_train_index": int | null, "clique_size": int, "flagged": bool,
                   "medoid_generation": int | null, "nearest_train_index": int | null,
                   "nearest_train_name": str | null, "nearest_train_distance": float | null, "extracted": bool,
                   "denoising_score": float, "amd_mean": float | null,
                   "grid": str | null (relative path of a PNG of that prompt's generations),
                   "train_image": str | null (relative path of a PNG of its nearest training image;
                                              null when redacted)} ],
     "images": [ {"prompt_index": int, "generation": int, "seed": int, "min_cosine_distance": float | null,
                  "nearest_train_index": int | null, "denoising_norm": float} ]
    }

Validation (the same for :func:`write_results` and :func:`load_results`): every top-level key above is required
(``kind`` and ``schema_version`` are filled in by :func:`write_results` when absent); ``settings``, ``seeds``,
``versions`` and ``summary`` are objects, ``prompts`` and ``images`` lists of objects, ``redacted`` a boolean;
``summary`` must hold the counts ``n_prompts``, ``n_images``, ``flagged_prompts``, ``extracted_prompts`` and
``extracted_training_images``; each prompt must hold ``index``, ``prompt`` and ``flagged``. Every other key is
read with a default (a missing nullable value renders as "—"). Non-finite floats are written as ``null`` so the
file is strict JSON. A file with a newer ``schema_version`` than :data:`SCHEMA_VERSION` is refused.

Redaction
---------
The report is redacted when ``redact=True`` is passed or the results say ``"redacted": true``. Then no
``train_image`` file is ever embedded (only the nearest training index, name and distance are shown), and, as a
second line of defence, a grid file that is the same file as, or byte-identical to, any ``train_image`` file is
withheld too. Note that the generated grids themselves are still shown: when a model has memorized an image its
generations can reproduce it, which is the point of the audit.

Image paths are only read inside the results folder: an absolute path, or one that escapes the folder (``..``,
symbolic links), is shown as a note and never read.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memaudit import __version__
from memaudit.errors import DataError
from memaudit.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

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
_OBJECT_KEYS = ("settings", "seeds", "versions", "summary")
_LIST_KEYS = ("prompts", "images")

MAX_PROMPTS = 50
MAX_TABLE_ROWS = 1000
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one embedded image; larger files are noted, not embedded
REDACTED_BANNER = "REDACTED: no training images"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"


# ----------------------------------------------------------------------------------------------------------------
# results.json
# ----------------------------------------------------------------------------------------------------------------


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
            if prompt.get("train_image") is not None:
                raise DataError(
                    f"results: marked redacted but \"prompts[{i}].train_image\" is set; leave training images out"
                )
    path = atomic_write_json(Path(folder) / RESULTS_NAME, data)
    logger.info("wrote %s", path)
    return path


def _results_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / RESULTS_NAME if path.is_dir() else path


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate ``results.json`` (``path`` is the file or its folder).

    Raises :class:`DataError` (one line) when the file is missing, unreadable, not JSON, not memaudit audit results,
    of a newer schema version, or missing a required key.
    """
    file = _results_file(path)
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


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib's object API on the Agg canvas: no pyplot, so the caller's backend and figures are untouched)
# ----------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _finite_floats(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None or isinstance(v, (bool, str)):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def histogram_png(values: Iterable[Any], title: str, xlabel: str, threshold: float | None = None) -> bytes:
    """A histogram of the finite values (None and NaN are skipped), with an optional threshold line; PNG bytes."""
    vals = _finite_floats(values)
    fig = _new_figure(6.0, 3.6)
    ax = fig.add_subplot()
    if vals:
        bins = min(50, max(5, int(math.sqrt(len(vals))) + 1))
        ax.hist(vals, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes, color="gray")
    if threshold is not None and math.isfinite(float(threshold)):
        ax.axvline(float(threshold), color="#c44e52", linestyle="--", linewidth=1.5,
                   label=f"threshold {_fmt(float(threshold))}")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{title} (n={len(vals)})", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png_bytes(fig)


def roc_png(fpr: Sequence[float], tpr: Sequence[float], auc: float | None) -> bytes:
    """An ROC curve in two panels, linear and log-log (where low-FPR behaviour is visible); PNG bytes."""
    fpr_l, tpr_l = list(fpr), list(tpr)
    if len(fpr_l) != len(tpr_l):
        raise DataError(f"ROC curve: fpr has {len(fpr_l)} points but tpr has {len(tpr_l)}")
    pairs = [(float(x), float(y)) for x, y in zip(fpr_l, tpr_l)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    xs = [p[0] for p in pairs]
    ys = [p[1] for p in pairs]
    fig = _new_figure(9.0, 4.0)
    lin, log = fig.subplots(1, 2)
    label = f"AUC {_fmt(auc)}" if auc is not None else "ROC"
    lin.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    lin.plot(xs, ys, color="#4c72b0", linewidth=1.5, label=label)
    lin.set_xlim(0, 1)
    lin.set_ylim(0, 1.01)
    lin.set_title("ROC (linear)", fontsize=10)
    positive = [(x, y) for x, y in pairs if x > 0 and y > 0]
    lo = min([x for x, _ in positive] + [1e-3]) / 2
    log.plot([lo, 1], [lo, 1], color="gray", linestyle=":", linewidth=1)
    if positive:
        log.plot([x for x, _ in positive], [y for _, y in positive], color="#4c72b0", linewidth=1.5, label=label)
    else:
        log.text(0.5, 0.5, "no positive points", ha="center", va="center", transform=log.transAxes, color="gray")
    log.set_xscale("log")
    log.set_yscale("log")
    log.set_xlim(lo, 1)
    log.set_ylim(lo, 1.05)
    for x in (0.01, 0.001):
        if x >= lo:
            log.axvline(x, color="#c44e52", linestyle="--", linewidth=0.8, alpha=0.6)
    log.set_title("ROC (log-log)", fontsize=10)
    for ax in (lin, log):
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if pairs:
            ax.legend(loc="lower right", fontsize=8)
    return _png_bytes(fig)


# ----------------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    """Numbers to short text: ints as they are, floats to ``digits`` significant digits; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_seconds(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        text = f"{_fmt(float(value))} s"
        if value >= 120:
            m, s = divmod(int(round(value)), 60)
            h, m = divmod(m, 60)
            text += f" ({h}:{m:02d}:{s:02d})"
        return text
    return _fmt(value)


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _compact(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return _fmt(value)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.meta th{width:13em}
.banner{background:#b00020;color:#fff;font-weight:bold;padding:.6em 1em;margin:.8em 0;font-size:1.15em;
border-radius:4px}
.note{color:#666;font-style:italic}
.card{border:1px solid #ddd;border-radius:6px;padding:.8em;margin:1em 0}
.card .prompt{font-weight:600;word-break:break-word;white-space:pre-wrap}
.pair{display:flex;flex-wrap:wrap;gap:1em;margin-top:.6em}
.pair figure{margin:0}.pair figcaption{font-size:.85em;color:#555}
.pair img{max-width:560px;max-height:420px;image-rendering:pixelated;border:1px solid #ccc}
.plot img{max-width:100%}
td.p{word-break:break-word;max-width:40em}
.yes{color:#b00020;font-weight:600}
"""


class _Images:
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
        self._forbidden_paths = set()
        for prompt in self._results.get("prompts") or []:
            rel = prompt.get("train_image") if isinstance(prompt, dict) else None
            if not isinstance(rel, str) or not rel:
                continue
            p = Path(rel)
            full = (p if p.is_absolute() else self.folder / p).resolve()
            self._forbidden_paths.add(full)
            try:
                if full.is_file() and full.stat().st_size <= MAX_IMAGE_BYTES:
                    self._forbidden_hashes.add(hashlib.sha256(full.read_bytes()).hexdigest())
            except OSError:
                pass

    def data_uri(self, rel: Any) -> tuple[str | None, str]:
        """``(data URI, "")`` or ``(None, note)`` for a relative image path from results.json."""
        if not isinstance(rel, str) or not rel.strip():
            return None, "(no image)"
        full = self._resolve(rel)
        if full is None:
            logger.warning("image path outside the results folder, not embedded: %s", rel)
            return None, f"(image path outside the results folder: {rel})"
        if not full.is_file():
            logger.warning("image file missing: %s", full)
            return None, f"(image file missing: {rel})"
        if self.redact:
            if self._forbidden_paths is None:
                self._load_forbidden()
            if full in self._forbidden_paths:
                return None, f"(withheld by redaction: {rel} is a training image)"
        try:
            size = full.stat().st_size
            if size > MAX_IMAGE_BYTES:
                return None, f"(image file too large to embed: {rel}, {size} bytes)"
            data = full.read_bytes()
        except OSError as exc:
            logger.warning("cannot read image %s: %s", full, exc)
            return None, f"(image file unreadable: {rel})"
        if self.redact and hashlib.sha256(data).hexdigest() in self._forbidden_hashes:
            return None, f"(withheld by redaction: {rel} is identical to a training image)"
        if data.startswith(_PNG_SIGNATURE):
            mime = "image/png"
        elif data.startswith(_JPEG_SIGNATURE):
            mime = "image/jpeg"
        else:
            return None, f"(not a PNG image: {rel})"
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", ""


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _plot(png: bytes, alt: str) -> str:
    return f'<div class="plot">{_img("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt)}</div>'


def _row(label: str, value: str, detail: str = "") -> str:
    return f"<tr><th>{_esc(label)}</th><td class=\"n\">{_esc(value)}</td><td>{_esc(detail)}</td></tr>"


def _pct(part: Any, whole: Any) -> str:
    if isinstance(part, int) and isinstance(whole, int) and not isinstance(part, bool) and whole > 0:
        return f"{100.0 * part / whole:.3g}% of {whole}"
    return ""


def _header(results: dict, redact: bool) -> list[str]:
    out = ["<h1>memaudit audit report</h1>"]
    if redact:
        out.append(f'<div class="banner">{_esc(REDACTED_BANNER)}</div>')
    versions = results.get("versions") or {}
    seeds = results.get("seeds") or {}
    meta = [
        ("Model", results.get("model")),
        ("Training data", results.get("train")),
        ("Prompts", results.get("prompts_source")),
        *([("Held-out data", results["heldout"])] if results.get("heldout") else []),
        ("Machine", results.get("machine")),
        ("Created (UTC)", results.get("created_utc")),
        ("Versions", ", ".join(f"{k} {_compact(v)}" for k, v in versions.items()) if isinstance(versions, dict)
         else _compact(versions)),
        ("Seeds", "; ".join(f"{k}: {_compact(v)}" for k, v in seeds.items()) if isinstance(seeds, dict)
         else _compact(seeds)),
    ]
    out.append('<table class="meta">')
    out += [f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in meta]
    out.append("</table>")
    settings = results.get("settings") or {}
    if isinstance(settings, dict) and settings:
        out.append("<h3>Settings</h3><table>")
        out += [f"<tr><th>{_esc(k)}</th><td>{_esc(_compact(v))}</td></tr>" for k, v in settings.items()]
        out.append("</table>")
    return out


def _summary(results: dict) -> list[str]:
    s = results.get("summary") or {}
    n_prompts = s.get("n_prompts")
    rows = [
        _row("Prompts", _fmt(n_prompts), f"{_fmt(s.get('generations_per_prompt'))} generations per prompt"),
        _row("Images generated", _fmt(s.get("n_images"))),
        _row("Flagged prompts", _fmt(s.get("flagged_prompts")),
             f"{_pct(s.get('flagged_prompts'), n_prompts)}; clique of ≥ {_fmt(s.get('min_clique'))} generations "
             f"at edge threshold {_fmt(s.get('edge_threshold'))}".lstrip("; ")),
        _row("Extracted prompts", _fmt(s.get("extracted_prompts")),
             f"{_pct(s.get('extracted_prompts'), n_prompts)}; δ = {_fmt(s.get('delta'))}".lstrip("; ")),
        _row("Extracted training images", _fmt(s.get("extracted_training_images"))),
        _row("AMD (average minimum cosine distance)", _fmt(s.get("amd")),
             f"feature extractor: {_fmt(s.get('feature_extractor'))}"),
        _row("Mean denoising strength", _fmt(s.get("denoising_mean"))),
        _row("Calibrated denoising threshold", _fmt(s.get("denoising_threshold")),
             f"FPR {_fmt(s.get('denoising_threshold_fpr'))}"),
        _row("Prompts above the threshold", _fmt(s.get("denoising_flagged")), _pct(s.get("denoising_flagged"), n_prompts)),
    ]
    det = s.get("detection")
    if isinstance(det, dict):
        rows += [
            _row("Detection AUC", _fmt(det.get("auc")),
                 f"{_fmt(det.get('n_pos'))} positives, {_fmt(det.get('n_neg'))} negatives; "
                 f"labels: {_fmt(det.get('label_source'))}"),
            _row("TPR at 1% FPR", _fmt(det.get("tpr_at_1pct"))),
            _row("TPR at 0.1% FPR", _fmt(det.get("tpr_at_01pct"))),
        ]
    q = s.get("quality")
    if isinstance(q, dict):
        rows += [
            _row("KID (held-out)", f"{_fmt(q.get('kid'))} ± {_fmt(q.get('kid_std'))}",
                 f"{_fmt(q.get('feature_extractor'))} features; {_fmt(q.get('n_fake'))} generations for the held-out "
                 f"captions against {_fmt(q.get('n_real'))} held-out images"),
            _row("FID (held-out)", _fmt(q.get("fid")),
                 f"{_fmt(q.get('note'))}"),
        ]
    a = s.get("alignment")
    if isinstance(a, dict):
        rows.append(_row("Text-image alignment", _fmt(a.get("mean"), 3),
                         f"scorer {_fmt(a.get('scorer'))}, mean over {_fmt(a.get('n_images'))} audited images"
                         + (f"; held-out captions {_fmt(a.get('reference_mean'), 3)}" if a.get("reference_mean") is not None else "")))
    m = s.get("mitigation")
    if isinstance(m, dict):
        if m.get("kind") == "rwa":
            detail = f"random word addition, {_fmt(m.get('rwa_words'))} tokens per prompt, drawn per image"
        else:
            detail = (f"prompt-embedding optimization to a per-image first-step norm of {_fmt(m.get('norm_target'))} "
                      f"({_fmt(m.get('norm_target_source'))}); norm {_fmt(m.get('first_step_norm_before_mean'))} → "
                      f"{_fmt(m.get('first_step_norm_after_mean'))}, {_fmt(m.get('optimizer_steps_mean'), 2)} steps "
                      f"per batch, {_fmt(m.get('images_over_target_after'))} of {_fmt(m.get('images'))} images still "
                      "over the target")
        rows.append(_row("Inference-time mitigation", _fmt(m.get("kind")), detail))
    rows += [
        _row("Wall time", _fmt_seconds(s.get("wall_time_s"))),
        _row("Sampling time", _fmt_seconds(s.get("sampling_time_s"))),
    ]
    return ["<h2>Summary</h2>", "<table>", *rows, "</table>"]


def _distance_key(prompt: dict) -> tuple:
    d = _num(prompt.get("nearest_train_distance"))
    idx = prompt.get("index")
    return (d is None, d if d is not None else 0.0, idx if isinstance(idx, int) else 0)


def _flagged(results: dict, images: _Images, redact: bool, max_prompts: int) -> list[str]:
    prompts = [p for p in results.get("prompts") or [] if isinstance(p, dict) and p.get("flagged")]
    prompts.sort(key=_distance_key)
    out = ["<h2>Flagged prompts</h2>"]
    if not prompts:
        return out + ['<p class="note">No prompt was flagged.</p>']
    out.append(f'<p class="note">{len(prompts)} flagged prompt(s), closest to a training image first.</p>')
    for p in prompts[:max_prompts]:
        extracted = bool(p.get("extracted"))
        facts = [
            f"prompt #{_fmt(p.get('index'))}",
            f"clique size {_fmt(p.get('clique_size'))}"
            + (" (greedy lower bound: the exact search hit its step cap)" if p.get("clique_exact") is False else ""),
            f"extracted: {'yes' if extracted else 'no'}",
            f"distance to nearest training image {_fmt(p.get('nearest_train_distance'))}",
            f"denoising score {_fmt(p.get('denoising_score'))}",
        ]
        if p.get("own_train_index") is not None:
            facts.append(f"own training image #{_fmt(p.get('own_train_index'))}")
        card = ['<div class="card">', f'<div class="prompt">{_esc(p.get("prompt"))}</div>',
                f"<div>{_esc(' · '.join(facts))}</div>", '<div class="pair">']
        uri, note = images.data_uri(p.get("grid"))
        medoid = p.get("medoid_generation")
        cap = "generations" + (f" (medoid: generation {_fmt(medoid)})" if medoid is not None else "")
        card.append("<figure>" + (_img(uri, "generations") if uri else f'<p class="note">{_esc(note)}</p>')
                    + f"<figcaption>{_esc(cap)}</figcaption></figure>")
        train_label = (f"nearest training image #{_fmt(p.get('nearest_train_index'))}"
                       + (f" ({p.get('nearest_train_name')})" if p.get("nearest_train_name") is not None else "")
                       + f", distance {_fmt(p.get('nearest_train_distance'))}")
        if redact:
            card.append(f'<figure><p class="note">{_esc(train_label)} — image withheld (redacted)</p></figure>')
        else:
            uri, note = images.data_uri(p.get("train_image"))
            card.append("<figure>" + (_img(uri, "nearest training image") if uri
                                      else f'<p class="note">{_esc(note)}</p>')
                        + f"<figcaption>{_esc(train_label)}</figcaption></figure>")
        card += ["</div>", "</div>"]
        out += card
    if len(prompts) > max_prompts:
        out.append(f'<p class="note">{len(prompts) - max_prompts} more flagged prompt(s) not shown; '
                   "see the table of all prompts below and results.json.</p>")
    return out


def _histograms(results: dict) -> list[str]:
    s = results.get("summary") or {}
    out = ["<h2>Distributions</h2>"]
    amd = _finite_floats(im.get("min_cosine_distance") for im in results.get("images") or [] if isinstance(im, dict))
    if amd:
        fx = s.get("feature_extractor")
        out.append(_plot(histogram_png(amd, "Per-image distance to the nearest training image",
                                       "min cosine distance" + (f" ({fx})" if fx else "")),
                         "histogram of per-image minimum cosine distance"))
    else:
        out.append('<p class="note">No per-image distances to training images in these results.</p>')
    den = _finite_floats(p.get("denoising_score") for p in results.get("prompts") or [] if isinstance(p, dict))
    if den:
        out.append(_plot(histogram_png(den, "Per-prompt denoising score", "denoising score",
                                       threshold=_num(s.get("denoising_threshold"))),
                         "histogram of per-prompt denoising score"))
    else:
        out.append('<p class="note">No per-prompt denoising scores in these results.</p>')
    return out


def _roc(results: dict) -> list[str]:
    det = (results.get("summary") or {}).get("detection")
    if not isinstance(det, dict):
        return []
    out = ["<h2>Detection ROC</h2>"]
    fpr, tpr = det.get("fpr"), det.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or not fpr:
        return out + ['<p class="note">No ROC curve points in these results.</p>']
    try:
        out.append(_plot(roc_png(fpr, tpr, _num(det.get("auc"))), "ROC curve, linear and log-log"))
    except (DataError, TypeError, ValueError) as exc:
        out.append(f'<p class="note">{_esc(f"(ROC curve not drawn: {exc})")}</p>')
    return out


def _table(results: dict, max_rows: int) -> list[str]:
    prompts = [p for p in results.get("prompts") or [] if isinstance(p, dict)]
    prompts.sort(key=lambda p: p.get("index") if isinstance(p.get("index"), int) else 0)
    out = ["<h2>All prompts</h2>", "<table>",
           "<tr><th>#</th><th>prompt</th><th>clique size</th><th>flagged</th><th>extracted</th>"
           "<th>denoising score</th><th>nearest distance</th></tr>"]
    for p in prompts[:max_rows]:
        flagged, extracted = bool(p.get("flagged")), bool(p.get("extracted"))
        out.append(
            f'<tr><td class="n">{_esc(_fmt(p.get("index")))}</td><td class="p">{_esc(p.get("prompt"))}</td>'
            f'<td class="n">{_esc(_fmt(p.get("clique_size")))}</td>'
            f'<td{" class=yes" if flagged else ""}>{"yes" if flagged else "no"}</td>'
            f'<td{" class=yes" if extracted else ""}>{"yes" if extracted else "no"}</td>'
            f'<td class="n">{_esc(_fmt(p.get("denoising_score")))}</td>'
            f'<td class="n">{_esc(_fmt(p.get("nearest_train_distance")))}</td></tr>'
        )
    out.append("</table>")
    if len(prompts) > max_rows:
        out.append(f'<p class="note">{len(prompts) - max_rows} more prompt(s) not shown; '
                   "the full list is in results.json.</p>")
    return out


def render_html(results: dict, folder: str | os.PathLike, redact: bool = False, *,
                max_prompts: int = MAX_PROMPTS, max_table_rows: int = MAX_TABLE_ROWS) -> str:
    """The self-contained HTML report of ``results`` whose image paths are relative to ``folder``.

    Redacted when ``redact`` is true or ``results["redacted"]`` is: then no training image is read or embedded.
    A missing or unreadable image file is shown as a note, never an error.
    """
    redact = bool(redact) or bool(results.get("redacted"))  # any truthy marker redacts: err on the safe side
    images = _Images(Path(folder), results, redact)
    title = "memaudit audit report" + (f" — {results.get('model')}" if results.get("model") else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        *_header(results, redact),
        *_summary(results),
        *_flagged(results, images, redact, max(0, int(max_prompts))),
        *_histograms(results),
        *_roc(results),
        *_table(results, max(0, int(max_table_rows))),
        f'<footer><p class="note">Built by memaudit {_esc(__version__)} from {_esc(RESULTS_NAME)} and the image '
        f'files beside it{" (redacted)" if redact else ""}.</p></footer>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(results_path: str | os.PathLike, out: str | os.PathLike | None = None, redact: bool = False) -> Path:
    """Load ``results_path`` (results.json or its folder), render the report and write it atomically.

    ``out`` defaults to ``report.html`` beside results.json; an existing folder gets ``report.html`` inside it.
    Returns the path written.
    """
    file = _results_file(results_path)
    results = load_results(file)
    folder = file.parent
    target = folder / REPORT_NAME if out is None else Path(out)
    if target.is_dir():
        target = target / REPORT_NAME
    path = atomic_write_text(target, render_html(results, folder, redact=redact))
    logger.info("wrote %s", path)
    return path
