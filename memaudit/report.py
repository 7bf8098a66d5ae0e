"""Audit results on disk (``results.json``) and the self-contained HTML report built from them.

An audit writes an output folder holding ``results.json`` and the PNG files it references by relative path
(one grid of generations per flagged prompt, and, unless redacted, the nearest training image of each flagged
prompt and that image after the model's VAE). :func:`render_html` / :func:`write_report` rebuild a single HTML file
from that folder alone: every image is embedded as a base64 ``data:`` URI and the histograms are inline SVG, so the
page needs no network, no external file and no JavaScript (a Content-Security-Policy in the page forbids all three).

The page reads as a privacy reviewer reads it: first a one-sentence verdict (training images reproduced, only
near-identical generations, or nothing flagged) with three numbers (prompts flagged, training images extracted,
AMD against the reference prompts' AMD), then the summary table with a plain sentence on when the detection AUC
means little, the flagged prompts (generations, nearest training image at the size of one generation tile, and
that image through the model's VAE), the distributions, the ROC, the table of all prompts, and last, folded in a
``<details>`` element, the model, data, machine, versions, seeds and settings.

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

Redaction
---------
The report is redacted when ``redact=True`` is passed or the results say ``"redacted": true``. Then no
``train_image`` or ``train_roundtrip`` file is ever embedded (only the nearest training index, name and distance
are shown), and, as a second line of defence, a grid file that is the same file as, or byte-identical to, any of
them is withheld too. A redacted audit also withholds the generations of *extracted* prompts (``grid`` null,
``grid_withheld`` true): the audit matched them to a training image, so they are one. The generations of prompts
that were flagged but not extracted are still shown.

Redacting an unredacted audit never rewrites it in place: :func:`write_redacted_report` writes a new folder (a
redacted ``results.json``, the grids of the non-extracted prompts, and ``report.html``) that can be shared, and
``write_report(path, redact=True)`` on unredacted results does exactly that, to ``<audit folder>-redacted`` beside
the audit folder unless ``out`` names the new folder. On results that are already redacted it just rebuilds the
report, as for unredacted ones. ``memaudit report RESULTS --redact [--out NEW_FOLDER]`` is this call.

Image paths are only read inside the results folder: an absolute path, or one that escapes the folder (``..``,
symbolic links), is shown as a note and never read.
"""

from __future__ import annotations

import base64
import bisect
import copy
import hashlib
import html
import io
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memaudit import __version__
from memaudit.core.errors import DataError
from memaudit.core.io import atomic_write_json, atomic_write_text, check_writable
from memaudit.core.outputs import check_clear, check_output, output_directory, real

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
_TRAIN_KEYS = ("train_image", "train_roundtrip")  # prompt keys naming training-image files: never in a redacted report
_OBJECT_KEYS = ("settings", "seeds", "versions", "summary")
_LIST_KEYS = ("prompts", "images")

MAX_PROMPTS = 50
MAX_TABLE_ROWS = 1000
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # one embedded image; larger files are noted, not embedded
REDACTED_BANNER = "REDACTED: no training images"
ROUNDTRIP_CAPTION = "through the model's VAE"  # the training image as the model can draw it at best

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
            for key in _TRAIN_KEYS:
                if prompt.get(key) is not None:
                    raise DataError(
                        f"results: marked redacted but \"prompts[{i}].{key}\" is set; leave training images out"
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


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
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


def histogram_counts(series: Sequence[Iterable[Any]], max_bins: int = 50) -> tuple[list[float], list[list[int]]]:
    """Shared bin edges for several series of values and each series' counts in them: ``(edges, [counts, ...])``.

    Only finite values count (None and NaN are skipped). The edges span all series together, with
    ``min(max_bins, max(5, floor(sqrt(n)) + 1))`` equal bins for ``n`` values in all; the last bin includes its right
    edge. With no values at all: ``([], [[], ...])``. This is what :func:`histogram_svg` draws.
    """
    cleaned = [_finite_floats(s) for s in series]
    everything = [v for s in cleaned for v in s]
    if not everything:
        return [], [[] for _ in cleaned]
    k = min(max(1, int(max_bins)), max(5, int(math.sqrt(len(everything))) + 1))
    lo, hi = min(everything), max(everything)
    if lo == hi:  # one distinct value: a unit-wide range around it, as matplotlib does
        lo, hi = lo - 0.5, hi + 0.5
    edges = [lo + (hi - lo) * i / k for i in range(k)] + [hi]
    counts = []
    for values in cleaned:
        c = [0] * k
        for v in values:
            c[min(k - 1, max(0, bisect.bisect_right(edges, v) - 1))] += 1
        counts.append(c)
    return edges, counts


_SERIES_COLORS = ("#4c72b0", "#dd8452")


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering ``[lo, hi]``: the step of 1, 2, 5 or 10 times a power of ten that divides the range
    into the number of intervals nearest ``target``, and every multiple of it inside the range (ends included when
    they fall on one)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    power = 10.0 ** math.floor(math.log10((hi - lo) / max(1, target)))
    step = min((m * power for m in (1, 2, 5, 10)), key=lambda st: abs((hi - lo) / st - target))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


#: size of a histogram's SVG canvas and its plot area's margins (left, right, top, bottom), in SVG units (px)
_SVG_SIZE, _SVG_MARGINS = (600, 340), (56, 16, 30, 44)


def histogram_svg(values: Iterable[Any], title: str, xlabel: str, threshold: float | None = None,
                  reference: Iterable[Any] | None = None,
                  labels: tuple[str, str] = ("audited prompts", "reference prompts")) -> str:
    """A histogram of the finite values (None and NaN are skipped), with an optional threshold line, as an inline
    ``<svg>`` element (with a ``<title>`` for screen readers; no script, no external reference).

    With ``reference`` (e.g. the reference prompts' scores) both series are drawn overlaid on the same axes with
    shared bins (:func:`histogram_counts`), in two colours, with a legend ``"{label} (n=...)"`` for each, so a
    threshold can be seen against both. Every bar is a ``<rect class="bar" data-series="i" data-count="c">``.

    Drawn here rather than by matplotlib because it is measurably better for the report: a few hundred bytes of
    vector markup in about a millisecond, where matplotlib took about 0.3 s per histogram plus 1.2 s to import on
    this 2-core CPU (together more than a tiny model's whole audit of 200 images; ``benchmarks/audit_speed.py``).
    """
    vals = _finite_floats(values)
    ref = None if reference is None else _finite_floats(reference)
    series = [vals] if ref is None else [vals, ref]
    edges, counts = histogram_counts(series)
    (width, height), (ml, mr, mt, mb) = _SVG_SIZE, _SVG_MARGINS
    x0, x1, y0, y1 = ml, width - mr, height - mb, mt  # plot area: x from x0 to x1, y from y0 (bottom) up to y1
    thr = float(threshold) if threshold is not None and math.isfinite(float(threshold)) else None
    heading = f"{title} (n={len(vals)})" if ref is None else title
    # no xmlns: inside HTML the parser puts <svg> in the SVG namespace, and the page names no URL at all
    out = [f'<svg class="histogram" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" font-family="sans-serif" font-size="11">',
           f"<title>{_esc(heading)}</title>",
           f'<text x="{(x0 + x1) / 2:g}" y="18" text-anchor="middle" font-size="13">{_esc(heading)}</text>']
    if not edges:
        out.append(f'<text x="{(x0 + x1) / 2:g}" y="{(y0 + y1) / 2:g}" text-anchor="middle" fill="gray">'
                   "no values</text>")
    else:
        lo, hi = edges[0], edges[-1]
        if thr is not None:
            lo, hi = min(lo, thr), max(hi, thr)
        pad = 0.02 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        top = max(max(c) for c in counts) or 1
        # headroom above the tallest bar: a little, or room for the legend in the top right when there is one
        ymax = top * (1.3 if ref is not None or thr is not None else 1.05)
        yticks = [t for t in nice_ticks(0, top) if t == int(t)]

        def sx(v: float) -> float:
            return x0 + (v - lo) / (hi - lo) * (x1 - x0)

        def sy(c: float) -> float:
            return y0 - c / ymax * (y0 - y1)

        for t in yticks:
            out.append(f'<line x1="{x0}" x2="{x1}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e5e5e5"/>'
                       f'<text x="{x0 - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{int(t)}</text>')
        for t in nice_ticks(lo, hi):
            out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{y0}" y2="{y0 + 4}" stroke="#333"/>'
                       f'<text x="{sx(t):.1f}" y="{y0 + 16}" text-anchor="middle">{_esc(_fmt(t))}</text>')
        opacity = ' fill-opacity="0.6"' if ref is not None else ""
        for i, (c, color) in enumerate(zip(counts, _SERIES_COLORS)):
            for k, n in enumerate(c):
                if n:
                    left, right = sx(edges[k]), sx(edges[k + 1])
                    out.append(f'<rect class="bar" data-series="{i}" data-count="{n}" x="{left:.2f}" '
                               f'y="{sy(n):.2f}" width="{max(right - left, 0.5):.2f}" height="{y0 - sy(n):.2f}" '
                               f'fill="{color}"{opacity} stroke="white" stroke-width="0.5"/>')
        if thr is not None:
            out.append(f'<line class="threshold" data-value="{thr!r}" x1="{sx(thr):.2f}" x2="{sx(thr):.2f}" '
                       f'y1="{y0}" y2="{y1}" stroke="#c44e52" stroke-width="1.5" stroke-dasharray="5 3"/>')
    out.append(f'<line x1="{x0}" x2="{x1}" y1="{y0}" y2="{y0}" stroke="#333"/>'
               f'<line x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}" stroke="#333"/>'
               f'<text x="{(x0 + x1) / 2:g}" y="{height - 8}" text-anchor="middle">{_esc(xlabel)}</text>'
               f'<text transform="translate(14 {(y0 + y1) / 2:g}) rotate(-90)" text-anchor="middle">count</text>')
    legend = [(f"{labels[i]} (n={len(series[i])})", _SERIES_COLORS[i], False) for i in range(len(series))
              if ref is not None]
    if edges and thr is not None:
        legend.append((f"threshold {_fmt(thr)}", "#c44e52", True))
    if legend:  # top right, on a white box over whatever bars are there
        out.append(f'<rect class="legend-box" x="{x1 - 196}" y="{y1}" width="196" height="{16 * len(legend) + 2}" '
                   'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for k, (text, color, dashed) in enumerate(legend):
        y = y1 + 8 + 16 * k
        mark = (f'<line x1="{x1 - 190}" x2="{x1 - 174}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="1.5" '
                'stroke-dasharray="5 3"/>' if dashed else
                f'<rect x="{x1 - 190}" y="{y - 5}" width="16" height="10" fill="{color}" fill-opacity="0.6"/>')
        out.append(f'<g class="legend">{mark}<text x="{x1 - 168}" y="{y + 4}">{_esc(text)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def roc_png(fpr: Sequence[float], tpr: Sequence[float], auc: float | None) -> bytes:
    """An ROC curve in two panels, linear and log-log (where low-FPR behaviour is visible); PNG bytes."""
    fpr_l, tpr_l = list(fpr), list(tpr)
    if len(fpr_l) != len(tpr_l):
        raise DataError(f"ROC curve: fpr has {len(fpr_l)} points but tpr has {len(tpr_l)}")
    pairs = [(float(x), float(y)) for x, y in zip(fpr_l, tpr_l)
             if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    xs = [p[0] for p in pairs]
    ys = [p[1] for p in pairs]
    fig = new_figure(9.0, 4.0)
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
    return figure_png(fig)


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
.verdict{border:2px solid;border-left-width:8px;border-radius:4px;padding:.7em 1em;margin:1em 0;font-size:1.15em;
font-weight:600}
.verdict.extracted{background:#fdecea;border-color:#b00020;color:#7a0016}
.verdict.flagged{background:#fff4e0;border-color:#c77700;color:#6b4000}
.verdict.clean{background:#e9f6ec;border-color:#2e7d32;color:#1b4d1f}
.headline{display:flex;flex-wrap:wrap;gap:1em;margin:.6em 0 1em}
.headline .num{border:1px solid #ddd;border-radius:4px;padding:.5em .9em;flex:1 1 16em;font-size:1.05em}
.headline .num .big{font-size:1.5em;font-weight:700;font-variant-numeric:tabular-nums}
.headline .num .detail{display:block;font-size:.85em;color:#555}
.explain{max-width:60em}
.note{color:#666;font-style:italic}
.card{border:1px solid #ddd;border-radius:6px;padding:.8em;margin:1em 0}
.card .prompt{font-weight:600;word-break:break-word;white-space:pre-wrap}
.pair{display:flex;flex-wrap:wrap;gap:1em;margin-top:.6em;align-items:flex-start}
.pair figure{margin:0;max-width:100%;min-width:0;overflow-x:auto}
.pair figcaption{font-size:.85em;color:#555}
.pair figcaption span{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:100%}
.pair img{max-width:none;height:auto;image-rendering:pixelated;border:1px solid #ccc;display:block}
.plot img,.plot svg{max-width:100%;height:auto}
td.p{word-break:break-word;max-width:40em}
.yes{color:#b00020;font-weight:600}
details.settings{margin-top:2em;border-top:2px solid #ddd;padding-top:.6em}
details.settings summary{font-size:1.2em;font-weight:600;cursor:pointer}
"""

MAX_TILE_CSS_PX = 128  # a generation tile (and the training images beside it) is shown at most this wide


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of PNG bytes from the IHDR chunk (bytes 16..24), or None when not a PNG."""
    if len(data) < 24 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return (width, height) if width > 0 and height > 0 else None


class _Image:
    """One embedded image: its data URI and pixel size, or the note saying why it is not shown."""

    __slots__ = ("uri", "note", "size")

    def __init__(self, uri: str | None, note: str = "", size: tuple[int, int] | None = None):
        self.uri, self.note, self.size = uri, note, size


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
        self._forbidden_paths, self._forbidden_hashes = _training_files(self._results, self.folder)

    def image(self, rel: Any) -> _Image:
        """The image at a relative path from results.json, or a note on why it is not shown."""
        if not isinstance(rel, str) or not rel.strip():
            return _Image(None, "(no image)")
        full = self._resolve(rel)
        if full is None:
            logger.warning("image path outside the results folder, not embedded: %s", rel)
            return _Image(None, f"(image path outside the results folder: {rel})")
        if not full.is_file():
            logger.warning("image file missing: %s", full)
            return _Image(None, f"(image file missing: {rel})")
        if self.redact:
            if self._forbidden_paths is None:
                self._load_forbidden()
            if full in self._forbidden_paths:
                return _Image(None, f"(withheld by redaction: {rel} is a training image)")
        try:
            size = full.stat().st_size
            if size > MAX_IMAGE_BYTES:
                return _Image(None, f"(image file too large to embed: {rel}, {size} bytes)")
            data = full.read_bytes()
        except OSError as exc:
            logger.warning("cannot read image %s: %s", full, exc)
            return _Image(None, f"(image file unreadable: {rel})")
        if self.redact and hashlib.sha256(data).hexdigest() in self._forbidden_hashes:
            return _Image(None, f"(withheld by redaction: {rel} is identical to a training image)")
        if data.startswith(_PNG_SIGNATURE):
            mime = "image/png"
        elif data.startswith(_JPEG_SIGNATURE):
            mime = "image/jpeg"
        else:
            return _Image(None, f"(not a PNG image: {rel})")
        return _Image(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", "", png_size(data))

    def data_uri(self, rel: Any) -> tuple[str | None, str]:
        """``(data URI, "")`` or ``(None, note)`` for a relative image path from results.json."""
        img = self.image(rel)
        return img.uri, img.note


def _training_files(results: dict, folder: Path, max_bytes: int | None = MAX_IMAGE_BYTES) -> tuple[set[Path], set[str]]:
    """Resolved paths and SHA-256 hashes of every file a prompt names as a training image (``train_image``,
    ``train_roundtrip``); paths are resolved against ``folder`` even when they escape it, so nothing slips through."""
    paths: set[Path] = set()
    hashes: set[str] = set()
    for prompt in results.get("prompts") or []:
        for key in _TRAIN_KEYS:
            rel = prompt.get(key) if isinstance(prompt, dict) else None
            if not isinstance(rel, str) or not rel:
                continue
            p = Path(rel)
            full = (p if p.is_absolute() else folder / p).resolve()
            paths.add(full)
            try:
                if full.is_file() and (max_bytes is None or full.stat().st_size <= max_bytes):
                    hashes.add(_sha256(full))
            except OSError:
                pass
    return paths, hashes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


def _plot(png: bytes, alt: str) -> str:
    return f'<div class="plot">{_img("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt)}</div>'


def _svg_plot(svg: str) -> str:
    return f'<div class="plot">{svg}</div>'


def _row(label: str, value: str, detail: str = "") -> str:
    return f"<tr><th>{_esc(label)}</th><td class=\"n\">{_esc(value)}</td><td>{_esc(detail)}</td></tr>"


def _pct(part: Any, whole: Any) -> str:
    if isinstance(part, int) and isinstance(whole, int) and not isinstance(part, bool) and whole > 0:
        return f"{100.0 * part / whole:.3g}% of {whole}"
    return ""


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _plural(n: int | None, word: str, plural: str | None = None) -> str:
    return f"{_fmt(n)} {word if n == 1 else (plural or word + 's')}"


def _mitigation_kind(summary: dict) -> str | None:
    m = summary.get("mitigation")
    kind = m.get("kind") if isinstance(m, dict) else None
    return str(kind) if kind else None


def verdict(results: dict) -> tuple[str, str]:
    """``(kind, sentence)``: the audit's one-sentence verdict, ``kind`` one of ``"extracted"`` (training images were
    reproduced), ``"flagged"`` (near-identical generations, none within δ of a training image) and ``"clean"``
    (nothing flagged at these settings)."""
    s = results.get("summary") or {}
    n = _int(s.get("n_prompts"))
    flagged = _int(s.get("flagged_prompts")) or 0
    ext_prompts = _int(s.get("extracted_prompts")) or 0
    ext_images = _int(s.get("extracted_training_images"))
    kind = _mitigation_kind(s)
    mitigation = f" with {kind} mitigation on" if kind else ""
    delta = _fmt(s.get("delta"))
    of_n = f" of {n}" if n is not None else ""
    if (ext_images or 0) > 0 or ext_prompts > 0:
        images = ext_images if ext_images is not None else ext_prompts
        n_train = _int(s.get("n_train"))
        return "extracted", (
            f"The model reproduces its training images{mitigation}: {_plural(images, 'training image')}"
            f"{f' (of {n_train})' if n_train is not None else ''} extracted: for {ext_prompts}{of_n} prompts, a "
            f"clique of near-identical generations lies within δ = {delta} of a training image."
        )
    if flagged > 0:
        return "flagged", (
            f"The model repeats near-identical generations for {flagged}{of_n} prompts{mitigation}, but none matched "
            f"a training image within δ = {delta}: no training image was extracted."
        )
    g = _int(s.get("generations_per_prompt"))
    budget = f"{_fmt(n)} prompts × {_fmt(g)} generations" + (f",{mitigation}" if mitigation else "")
    return "clean", (
        f"No prompt was flagged at these settings ({budget}): evidence against reproduction of training images at "
        "this sampling budget, not proof."
    )


def _headline(results: dict) -> list[str]:
    """The verdict box and the three numbers a reviewer needs first."""
    s = results.get("summary") or {}
    kind, sentence = verdict(results)
    n = _int(s.get("n_prompts"))
    flagged = s.get("flagged_prompts")
    images = s.get("extracted_training_images")
    n_train = _int(s.get("n_train"))
    amd, ref_amd = _num(s.get("amd")), _num(s.get("reference_amd"))
    if amd is None:
        amd_detail = "not computed"
    elif ref_amd is not None:
        amd_detail = (f"generations for the reference prompts: {_fmt(ref_amd)}; lower means closer to the "
                      "training set")
    else:
        amd_detail = "lower means closer to the training set (no reference prompts to compare with)"
    numbers = [
        (_fmt(flagged), f"of {_fmt(n)} prompts flagged" if n is not None else "prompts flagged", ""),
        (_fmt(images), (f"of {n_train} training images extracted" if n_train is not None
                        else ("training image extracted" if images == 1 else "training images extracted")), ""),
        ("AMD " + _fmt(amd), "", amd_detail),
    ]
    out = [f'<div class="verdict {kind}">{_esc(sentence)}</div>', '<div class="headline">']
    for big, text, detail in numbers:
        out.append(f'<div class="num"><span class="big">{_esc(big)}</span> {_esc(text)}'
                   + (f'<span class="detail">{_esc(detail)}</span>' if detail else "") + "</div>")
    out.append("</div>")
    return out


def adapter_line(a: dict) -> str:
    """One applied LoRA adapter: its file, scale and SHA-256, and how much of it matched the model."""
    line = f"{a.get('file') or a.get('path')} at scale {_fmt(a.get('scale'))} (SHA-256 {str(a.get('sha256'))[:12]}...)"
    if a.get("partial"):
        line += (f": PARTIAL, matched {_fmt(a.get('modules_matched'))} of the {_fmt(a.get('modules_named'))} modules its "
                 f"{_fmt(a.get('keys'))} keys name")
    return line


def _settings(results: dict) -> list[str]:
    """Where the numbers come from, folded at the end of the page: model, data, machine, versions, seeds, settings."""
    versions = results.get("versions") or {}
    seeds = results.get("seeds") or {}
    meta = [
        ("Model", results.get("model")),
        *([("LoRA adapters", "; ".join(adapter_line(a) for a in results["adapters"] if isinstance(a, dict)))]
          if isinstance(results.get("adapters"), list) and results["adapters"] else []),
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
    out = ['<details class="settings"><summary>Settings, seeds and versions</summary>', '<table class="meta">']
    out += [f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in meta]
    out.append("</table>")
    settings = results.get("settings") or {}
    if isinstance(settings, dict) and settings:
        out.append("<h3>Settings</h3><table>")
        out += [f"<tr><th>{_esc(k)}</th><td>{_esc(_compact(v))}</td></tr>" for k, v in settings.items()]
        out.append("</table>")
    out.append("</details>")
    return out


def _reference_count(results: dict) -> int | None:
    """How many reference prompts the audit had: ``settings.reference_prompts``, else the length of the
    ``reference_prompts`` list; None when the results do not say."""
    n = _int((results.get("settings") or {}).get("reference_prompts"))
    if n is not None:
        return n
    ref = results.get("reference_prompts")
    return len(ref) if isinstance(ref, list) and ref else None


SMALL_CLASS = 5  # fewer positives or negatives than this and the AUC is only indicative


def detection_note(results: dict) -> str | None:
    """One or two plain sentences on when the detection AUC / TPR are not meaningful, or None when there is
    nothing to say (or nothing to judge)."""
    s = results.get("summary") or {}
    det = s.get("detection")
    n = _int(s.get("n_prompts"))
    ext = _int(s.get("extracted_prompts"))
    n_ref = _reference_count(results)
    more = "pass --reference-prompts or --heldout"
    if not isinstance(det, dict):
        if not n or ext is None:
            return None
        if ext == n and not n_ref:
            return (f"AUC not computed: every audited prompt ({n} of {n}) is extracted and there are no reference "
                    f"prompts known not to be memorized, so all labels are positive; {more}.")
        if ext == 0:
            tail = {None: "", 0: " and there are no reference prompts"}.get(
                n_ref, f"; the {n_ref} reference prompts add only negatives")
            return f"AUC not computed: no audited prompt is extracted, so there is no memorized prompt to detect{tail}."
        return "AUC not computed: these results hold no detection summary."
    notes = []
    n_pos, n_neg = _int(det.get("n_pos")), _int(det.get("n_neg"))
    small = [_plural(k, word) for k, word in ((n_pos, "positive"), (n_neg, "negative"))
             if k is not None and k < SMALL_CLASS]
    if small:
        notes.append(f"AUC rests on only {' and '.join(small)}: treat it and the TPRs as indicative.")
    auc = _num(det.get("auc"))
    if auc is not None and auc < 0.5:
        notes.append(f"AUC {_fmt(auc, 2)} is below chance: the denoising score is higher for the negatives than for "
                     "the memorized prompts, so on this model it does not point at memorization; trust the extraction "
                     "verdicts.")
    if n_neg is not None and 0 < n_neg < 1000:
        at = "0.1% FPR" if n_neg >= 100 else "1% and 0.1% FPR"
        notes.append(f"With {n_neg} negatives the smallest non-zero FPR is {_fmt(1 / n_neg, 2)}, so the TPR at {at} "
                     "is the TPR with no false positive at all.")
    if "reference" not in str(det.get("label_source") or "").lower():
        notes.append("Labels come from the audited prompts only: the negatives are audited prompts the extraction "
                     "attack did not extract, not prompts known to be clean"
                     + (f"; {more} for known-clean negatives." if not n_ref else "."))
    return " ".join(notes) or None


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
                 f"captions against {_fmt(q.get('n_real'))} held-out images"
                 + (f" ({_fmt(q['heldout_in_train'])} of them also training images: they flatter the score)"
                    if q.get("heldout_in_train") else "")),
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
    out = ["<h2>Summary</h2>", "<table>", *rows, "</table>"]
    note = detection_note(results)
    if note:
        out.append(f'<p class="explain">{_esc(note)}</p>')
    if s.get("denoising_note"):
        out.append(f'<p class="explain">{_esc(s["denoising_note"])}</p>')
    if s.get("denoising_threshold") is None and _reference_count(results) == 0:
        out.append('<p class="explain">No denoising threshold: it is calibrated on reference prompts known not to be '
                   "memorized, and this audit had none; pass --reference-prompts or --heldout.</p>")
    return out


def _distance_key(prompt: dict) -> tuple:
    d = _num(prompt.get("nearest_train_distance"))
    idx = prompt.get("index")
    return (d is None, d if d is not None else 0.0, idx if isinstance(idx, int) else 0)


def distance_explanation(results: dict) -> str:
    """What the distances on the flagged-prompt cards mean, from the settings the audit ran with."""
    s = results.get("summary") or {}
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    size = _int(settings.get("extraction_size"))
    tiles = _int(settings.get("tiles"))
    edge = settings.get("edge_threshold_used")
    edge = edge if _num(edge) is not None else s.get("edge_threshold")
    over = f"{tiles}×{tiles} tiles" if tiles is not None else "tiles"
    return (
        "distance: RMS pixel difference on [0, 1] over the whole image"
        + (f" at ≤{size} px" if size is not None else "")
        + " between the clique's medoid and the training image (the prompt's own training image when known); "
        f"extracted when under δ = {_fmt(s.get('delta'))}. Generations are joined when the maximum over {over} of "
        f"the per-tile RMS difference is under {_fmt(edge)}; a prompt is flagged when at least "
        f"{_fmt(s.get('min_clique'))} of its generations are all joined to each other."
    )


def _caption(*labels: str) -> str:
    """A figure caption of short labels, one per line, none of them wrapped (a too-long one is cut with an
    ellipsis, its full text in the tooltip)."""
    return "<figcaption>" + "".join(f'<span title="{_esc(t)}">{_esc(t)}</span>' for t in labels if t) + "</figcaption>"


def _sized_img(image: _Image, alt: str, width: float | None) -> str:
    style = f' style="width:{width:.6g}px"' if width else ""
    return f'<img src="{image.uri}" alt="{_esc(alt)}"{style}>'


def _tile_width(grid: _Image, columns: Any) -> tuple[float | None, float | None]:
    """``(grid display width, tile display width)`` in CSS px: the grid PNG is ``columns`` tiles wide; a tile is
    shown at its pixel width, at most :data:`MAX_TILE_CSS_PX`, and the grid at the same scale."""
    if grid.size is None:
        return None, None
    width = grid.size[0]
    cols = _int(columns)
    if cols is None or cols < 1 or width < cols:
        return float(width), None
    tile = width / cols
    scale = min(1.0, MAX_TILE_CSS_PX / tile)
    return width * scale, tile * scale


def _flagged(results: dict, images: _Images, redact: bool, max_prompts: int) -> list[str]:
    prompts = [p for p in results.get("prompts") or [] if isinstance(p, dict) and p.get("flagged")]
    prompts.sort(key=_distance_key)
    out = ["<h2>Flagged prompts</h2>"]
    if not prompts:
        return out + ['<p class="note">No prompt was flagged.</p>']
    out.append(f'<p class="note">{len(prompts)} flagged prompt(s), closest to a training image first.</p>')
    out.append(f'<p class="explain">{_esc(distance_explanation(results))}</p>')
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
        medoid = p.get("medoid_generation")
        train = None if redact else images.image(p.get("train_image"))
        tile = None
        if p.get("grid_withheld") is True and not p.get("grid"):
            card.append('<figure><p class="note">generations withheld (redacted): the audit matched them to a '
                        "training image</p></figure>")
        else:
            grid = images.image(p.get("grid"))
            columns = p.get("grid_columns")
            if _int(columns) is None and grid.size and train is not None and train.size \
                    and grid.size[0] % train.size[0] == 0:
                columns = grid.size[0] // train.size[0]  # older results: the training image is one tile wide
            grid_width, tile = _tile_width(grid, columns)
            card.append("<figure>" + (_sized_img(grid, "generations", grid_width) if grid.uri
                                      else f'<p class="note">{_esc(grid.note)}</p>')
                        + _caption("generations", f"(medoid: generation {_fmt(medoid)})" if medoid is not None
                                   else "") + "</figure>")
        name = p.get("nearest_train_name")
        train_labels = (f"nearest training image #{_fmt(p.get('nearest_train_index'))}",
                        f"({name})" if name is not None else "",
                        f"distance {_fmt(p.get('nearest_train_distance'))}")
        if train is None:  # redacted
            label = f"{train_labels[0]}{' ' + train_labels[1] if name is not None else ''}, {train_labels[2]}"
            card.append(f'<figure><p class="note">{_esc(label)} — image withheld (redacted)</p></figure>')
        else:
            width = tile or (float(train.size[0]) if train.size else None)
            card.append("<figure>" + (_sized_img(train, "nearest training image", width) if train.uri
                                      else f'<p class="note">{_esc(train.note)}</p>')
                        + _caption(*train_labels) + "</figure>")
            if p.get("train_roundtrip"):
                drawn = images.image(p.get("train_roundtrip"))
                width = tile or (float(drawn.size[0]) if drawn.size else None)
                card.append("<figure>" + (_sized_img(drawn, "training image through the model's VAE", width)
                                          if drawn.uri else f'<p class="note">{_esc(drawn.note)}</p>')
                            + _caption("the same image", ROUNDTRIP_CAPTION, "(the best the model can draw)")
                            + "</figure>")
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
        out.append(_svg_plot(histogram_svg(amd, "Per-image distance to the nearest training image",
                                           "min cosine distance" + (f" ({fx})" if fx else ""))))
    else:
        out.append('<p class="note">No per-image distances to training images in these results.</p>')
    den = _finite_floats(p.get("denoising_score") for p in results.get("prompts") or [] if isinstance(p, dict))
    ref = reference_scores(results)
    if den:
        kwargs: dict[str, Any] = {"threshold": _num(s.get("denoising_threshold"))}
        if ref:
            kwargs["reference"] = ref
        out.append(_svg_plot(histogram_svg(den, "Per-prompt denoising score", "denoising score", **kwargs)))
    else:
        out.append('<p class="note">No per-prompt denoising scores in these results.</p>')
    return out


def reference_scores(results: dict) -> list[float]:
    """The finite denoising scores of the reference prompts (``results["reference_prompts"]``; [] when absent)."""
    ref = results.get("reference_prompts")
    if not isinstance(ref, list):
        return []
    return _finite_floats(r.get("denoising_score") for r in ref if isinstance(r, dict))


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
        "<h1>memaudit audit report</h1>",
        *([f'<div class="banner">{_esc(REDACTED_BANNER)}</div>'] if redact else []),
        *_headline(results),
        *_summary(results),
        *_flagged(results, images, redact, max(0, int(max_prompts))),
        *_histograms(results),
        *_roc(results),
        *_table(results, max(0, int(max_table_rows))),
        *_settings(results),
        f'<footer><p class="note">Built by memaudit {_esc(__version__)} from {_esc(RESULTS_NAME)} and the image '
        f'files beside it{" (redacted)" if redact else ""}.</p></footer>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


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
    file = _results_file(results_path)
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
                         if isinstance(prompt, dict) for key in ("grid", *_TRAIN_KEYS)
                         if isinstance(rel := prompt.get(key), str) and rel.strip()])
    if target.exists() and not _is_report(target):
        raise DataError(f"--out {target} exists and is not a report memaudit wrote; memaudit never replaces it: pass "
                        "a new file name.")


def redact_results(results: dict) -> dict:
    """A redacted deep copy of ``results``: ``redacted`` true, every prompt's ``train_image`` and ``train_roundtrip``
    null, and the generations of extracted prompts withheld (``grid`` null, ``grid_withheld`` true)."""
    out = copy.deepcopy(results)
    out["redacted"] = True
    for prompt in out.get("prompts") or []:
        if not isinstance(prompt, dict):
            continue
        for key in _TRAIN_KEYS:
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
    file = _results_file(results_path)
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
    forbidden_paths, forbidden_hashes = _training_files(results, folder, max_bytes=None)
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
        if full in forbidden_paths or _sha256(full) in forbidden_hashes:
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
