"""The report's figures: histograms as inline SVG, drawn here, and the ROC curve as a PNG drawn by matplotlib.

matplotlib is used through its object API on the Agg canvas: no pyplot, so the caller's backend and figures are
untouched (:func:`new_figure`, :func:`figure_png`; the mask search draws its figures with them too).
"""

from __future__ import annotations

import bisect
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

from memaudit.core.errors import DataError
from memaudit.report.text import esc, finite_floats, fmt


def new_figure(width: float, height: float):
    """A matplotlib figure of ``width`` × ``height`` inches at 100 dpi on its own Agg canvas (no pyplot)."""
    # matplotlib takes about 1.2 s to import on a 2-core CPU: only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """The PNG bytes of a figure from :func:`new_figure`, without matplotlib's version in the file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def histogram_counts(series: Sequence[Iterable[Any]], max_bins: int = 50) -> tuple[list[float], list[list[int]]]:
    """Shared bin edges for several series of values and each series' counts in them: ``(edges, [counts, ...])``.

    Only finite values count (None and NaN are skipped). The edges span all series together, with
    ``min(max_bins, max(5, floor(sqrt(n)) + 1))`` equal bins for ``n`` values in all; the last bin includes its right
    edge. With no values at all: ``([], [[], ...])``. This is what :func:`histogram_svg` draws.
    """
    cleaned = [finite_floats(s) for s in series]
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
    vals = finite_floats(values)
    ref = None if reference is None else finite_floats(reference)
    series = [vals] if ref is None else [vals, ref]
    edges, counts = histogram_counts(series)
    (width, height), (ml, mr, mt, mb) = _SVG_SIZE, _SVG_MARGINS
    x0, x1, y0, y1 = ml, width - mr, height - mb, mt  # plot area: x from x0 to x1, y from y0 (bottom) up to y1
    thr = float(threshold) if threshold is not None and math.isfinite(float(threshold)) else None
    heading = f"{title} (n={len(vals)})" if ref is None else title
    # no xmlns: inside HTML the parser puts <svg> in the SVG namespace, and the page names no URL at all
    out = [f'<svg class="histogram" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" font-family="sans-serif" font-size="11">',
           f"<title>{esc(heading)}</title>",
           f'<text x="{(x0 + x1) / 2:g}" y="18" text-anchor="middle" font-size="13">{esc(heading)}</text>']
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
                       f'<text x="{sx(t):.1f}" y="{y0 + 16}" text-anchor="middle">{esc(fmt(t))}</text>')
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
               f'<text x="{(x0 + x1) / 2:g}" y="{height - 8}" text-anchor="middle">{esc(xlabel)}</text>'
               f'<text transform="translate(14 {(y0 + y1) / 2:g}) rotate(-90)" text-anchor="middle">count</text>')
    legend = [(f"{labels[i]} (n={len(series[i])})", _SERIES_COLORS[i], False) for i in range(len(series))
              if ref is not None]
    if edges and thr is not None:
        legend.append((f"threshold {fmt(thr)}", "#c44e52", True))
    out += _svg_legend(legend, x1, y1)
    out.append("</svg>")
    return "".join(out)


def _svg_legend(legend: list[tuple[str, str, bool]], x1: float, y1: float) -> list[str]:
    """The SVG of a histogram's legend, entries ``(text, colour, dashed line or not)``, in the top right corner
    (``x1``, ``y1``) of the plot area; nothing when there are no entries."""
    out = []
    if legend:  # top right, on a white box over whatever bars are there
        out.append(f'<rect class="legend-box" x="{x1 - 196}" y="{y1}" width="196" height="{16 * len(legend) + 2}" '
                   'fill="white" fill-opacity="0.85" stroke="#ccc"/>')
    for k, (text, color, dashed) in enumerate(legend):
        y = y1 + 8 + 16 * k
        mark = (f'<line x1="{x1 - 190}" x2="{x1 - 174}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="1.5" '
                'stroke-dasharray="5 3"/>' if dashed else
                f'<rect x="{x1 - 190}" y="{y - 5}" width="16" height="10" fill="{color}" fill-opacity="0.6"/>')
        out.append(f'<g class="legend">{mark}<text x="{x1 - 168}" y="{y + 4}">{esc(text)}</text></g>')
    return out


def roc_png(fpr: Sequence[float], tpr: Sequence[float], auc: float | None) -> bytes:
    """An ROC curve in two panels, linear and log-log (where low-FPR behaviour is visible); PNG bytes."""
    return rocs_png([(f"AUC {fmt(auc)}" if auc is not None else "ROC", fpr, tpr)])


#: the colours of overlaid curves, in order
CURVE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def rocs_png(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> bytes:
    """ROC curves ``(label, fpr, tpr)`` overlaid in two panels, linear and log-log; PNG bytes."""
    points = []
    for label, fpr, tpr in curves:
        fpr_l, tpr_l = list(fpr), list(tpr)
        if len(fpr_l) != len(tpr_l):
            raise DataError(f"ROC curve {label}: fpr has {len(fpr_l)} points but tpr has {len(tpr_l)}")
        points.append((label, [(float(x), float(y)) for x, y in zip(fpr_l, tpr_l)
                               if x is not None and y is not None and math.isfinite(float(x))
                               and math.isfinite(float(y))]))
    fig = new_figure(9.0, 4.0)
    lin, log = fig.subplots(1, 2)
    lin.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    positives = [[(x, y) for x, y in pairs if x > 0 and y > 0] for _, pairs in points]
    lo = min([x for positive in positives for x, _ in positive] + [1e-3]) / 2
    log.plot([lo, 1], [lo, 1], color="gray", linestyle=":", linewidth=1)
    for k, ((label, pairs), positive) in enumerate(zip(points, positives)):
        color = CURVE_COLORS[k % len(CURVE_COLORS)]
        lin.plot([p[0] for p in pairs], [p[1] for p in pairs], color=color, linewidth=1.5, label=label)
        if positive:
            log.plot([x for x, _ in positive], [y for _, y in positive], color=color, linewidth=1.5, label=label)
    if not any(positives):
        log.text(0.5, 0.5, "no positive points", ha="center", va="center", transform=log.transAxes, color="gray")
    lin.set_xlim(0, 1)
    lin.set_ylim(0, 1.01)
    lin.set_title("ROC (linear)", fontsize=10)
    log.set_xscale("log")
    log.set_yscale("log")
    log.set_xlim(lo, 1)
    log.set_ylim(lo, 1.05)
    for x in (0.01, 0.001):
        if x >= lo:
            log.axvline(x, color="#c44e52", linestyle="--", linewidth=0.8, alpha=0.6)
    log.set_title("ROC (log-log)", fontsize=10)
    for ax, has in ((lin, any(pairs for _, pairs in points)), (log, any(positives))):
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        if has:
            ax.legend(loc="lower right", fontsize=8)
    return figure_png(fig)
