"""Detection metrics: ROC curve, AUC, TPR at a fixed FPR, thresholds calibrated on non-memorized prompts.

Conventions: a higher score means "more likely memorized"; labels are 1 for memorized (positive) and 0 for
non-memorized. A score is *flagged* by a threshold ``t`` when ``score > t`` (strictly), which is how
:func:`calibrate_threshold` is defined.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_bytes

logger = logging.getLogger(__name__)


def _scores(scores, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ConfigError(f"{name} is empty; pass at least one score.")
    if not np.isfinite(s).all():
        raise ConfigError(f"{name} contains NaN or infinite values; remove those prompts first.")
    return s


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores)
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(s):
        raise ConfigError(f"{len(s)} scores but {len(y)} labels; pass one label per score.")
    if not np.isin(y, (0, 1, True, False)).all():
        raise ConfigError("labels must be 0 (non-memorized) or 1 (memorized).")
    y = y.astype(np.int64)
    if y.min() == y.max():
        raise ConfigError("detection metrics need both memorized and non-memorized examples, but all labels are "
                          f"{int(y[0])}; add examples of the other class.")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve (``sklearn.metrics.roc_curve``, all points kept). A point
    flags the scores ``>= threshold``; the first point (threshold +inf) flags nothing."""
    from sklearn.metrics import roc_curve as _roc

    s, y = _check(scores, labels)
    fpr, tpr, thr = _roc(y, s, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thr


def auc(scores, labels) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``): 1.0 when every memorized example scores
    above every non-memorized one, 0.5 for chance."""
    from sklearn.metrics import roc_auc_score

    s, y = _check(scores, labels)
    return float(roc_auc_score(y, s))


def tpr_at_fpr(scores, labels, fpr: float) -> float:
    """The largest TPR among the ROC points whose FPR is ``<= fpr`` (0.0 if there is none)."""
    if not (isinstance(fpr, (int, float)) and 0.0 <= float(fpr) <= 1.0):
        raise ConfigError(f"fpr must be in [0, 1], got {fpr!r}.")
    f, t, _ = roc_curve(scores, labels)
    ok = f <= float(fpr)
    return float(t[ok].max()) if ok.any() else 0.0


def calibrate_threshold(reference_scores, fpr: float = 0.01) -> float:
    """Threshold ``t`` on scores of reference (non-memorized) prompts such that flagging ``score > t`` flags at
    most a fraction ``fpr`` of them, as tightly as possible.

    With ``n`` reference scores sorted ascending ``s_(1) <= ... <= s_(n)`` and ``k = floor(fpr * n)``, ``t`` is
    ``s_(n-k)``: only the ``k`` largest scores can exceed it (fewer when there are ties at ``t``), so the empirical
    FPR is ``<= k / n <= fpr``. ``fpr`` must be in (0, 1).
    """
    if not (isinstance(fpr, (int, float)) and math.isfinite(fpr) and 0.0 < float(fpr) < 1.0):
        raise ConfigError(f"fpr must be in (0, 1), got {fpr!r}.")
    s = np.sort(_scores(reference_scores, "reference scores"))
    n = len(s)
    # the 1e-9 absorbs rounding in fpr * n (0.29 * 100 = 28.999999999999996); k / n never exceeds fpr by more
    k = min(n - 1, int(math.floor(float(fpr) * n + 1e-9)))
    t = float(s[n - 1 - k])
    logger.info("threshold %.6g flags %d of %d reference scores (target FPR %g)", t, int((s > t).sum()), n, fpr)
    return t


@dataclass
class DetectionSummary:
    """AUC, TPR at 1% and 0.1% FPR, class counts and the ROC points of one detector."""

    auc: float
    tpr_at_1pct: float
    tpr_at_01pct: float
    n_pos: int
    n_neg: int
    fpr: list[float] = field(default_factory=list)
    tpr: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(scores, labels) -> DetectionSummary:
    """:class:`DetectionSummary` of ``scores`` (higher = memorized) against ``labels`` (1 = memorized)."""
    s, y = _check(scores, labels)
    f, t, _ = roc_curve(s, y)
    return DetectionSummary(auc=auc(s, y), tpr_at_1pct=tpr_at_fpr(s, y, 0.01), tpr_at_01pct=tpr_at_fpr(s, y, 0.001),
                            n_pos=int(y.sum()), n_neg=int(len(y) - y.sum()), fpr=[float(v) for v in f],
                            tpr=[float(v) for v in t])


def plot_roc(summary_or_list: DetectionSummary | dict[str, DetectionSummary], path: str | os.PathLike,
             log: bool = True) -> Path:
    """Write a PNG of the ROC curve(s): linear axes and, with ``log``, log-log axes side by side, with the chance
    diagonal and the AUC in the legend. ``summary_or_list`` is one summary or ``{name: summary}``. The file is
    written atomically; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    curves = summary_or_list if isinstance(summary_or_list, dict) else {"detector": summary_or_list}
    if not curves:
        raise ConfigError("plot_roc needs at least one detection summary.")
    panels = 2 if log else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.5), squeeze=False)
    try:
        for col, ax in enumerate(axes[0]):
            logscale = col == 1
            for name, s in curves.items():
                f, t = np.asarray(s.fpr, dtype=float), np.asarray(s.tpr, dtype=float)
                ax.plot(f, t, lw=1.5, label=f"{name} (AUC {s.auc:.3f})")
            if logscale:
                n_neg = max([s.n_neg for s in curves.values()] + [1])
                lo = min(1e-3, 1.0 / max(n_neg, 1))
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlim(lo, 1.0)
                ax.set_ylim(lo, 1.05)
                grid = np.logspace(math.log10(lo), 0, 50)
                ax.plot(grid, grid, "k--", lw=0.8, label="chance")
                ax.set_title("ROC (log-log)")
            else:
                ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1.02)
                ax.set_title("ROC")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
