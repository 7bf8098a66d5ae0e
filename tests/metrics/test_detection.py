"""Known answers for the detection metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memaudit.core.errors import ConfigError
from memaudit.metrics.detection import (
    DetectionSummary,
    auc,
    calibrate_threshold,
    plot_roc,
    roc_curve,
    summarize,
    tpr_at_fpr,
)

SCORES = [0.9, 0.8, 0.7, 0.6, 0.5]
LABELS = [1, 0, 1, 0, 0]


def test_auc_separated_and_reversed():
    scores = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 1, 1, 1]
    assert auc(scores, labels) == 1.0
    assert auc(scores, [1 - y for y in labels]) == 0.0
    assert auc(SCORES, LABELS) == pytest.approx(5 / 6)  # 5 of the 6 (pos, neg) pairs ordered right


def test_roc_curve_points():
    fpr, tpr, thr = roc_curve(SCORES, LABELS)
    assert np.allclose(fpr, [0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    assert np.allclose(tpr, [0, 0.5, 0.5, 1, 1, 1])
    assert np.isinf(thr[0]) and np.allclose(thr[1:], SCORES)


def test_tpr_at_fpr_hand_example():
    assert tpr_at_fpr(SCORES, LABELS, 0.0) == 0.5
    assert tpr_at_fpr(SCORES, LABELS, 0.3) == 0.5
    assert tpr_at_fpr(SCORES, LABELS, 0.5) == 1.0
    # the top-scored example is negative: nothing is detected at FPR 0
    assert tpr_at_fpr([0.9, 0.8], [0, 1], 0.0) == 0.0


def test_single_class_is_a_config_error():
    for fn in (auc, summarize, roc_curve):
        with pytest.raises(ConfigError, match="both memorized and non-memorized"):
            fn([0.1, 0.2], [1, 1])
    with pytest.raises(ConfigError, match="labels"):
        auc([0.1, 0.2], [1])
    with pytest.raises(ConfigError, match="NaN"):
        auc([0.1, float("nan")], [0, 1])


@pytest.mark.parametrize("fpr", [0.01, 0.001, 0.05, 0.29, 0.5])
def test_calibrate_threshold_is_tight(fpr):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=1000)
    t = calibrate_threshold(ref, fpr=fpr)
    flagged = int((ref > t).sum())
    assert flagged / len(ref) <= fpr
    assert flagged == math.floor(fpr * len(ref) + 1e-9)  # distinct scores: exactly floor(fpr * n)


def test_calibrate_threshold_with_ties():
    ref = np.array([0.0] * 990 + [1.0] * 10)
    t = calibrate_threshold(ref, fpr=0.005)  # may flag at most 5, the 10 tied top scores cannot be split
    assert int((ref > t).sum()) == 0
    t = calibrate_threshold(ref, fpr=0.01)
    assert int((ref > t).sum()) == 10


def test_calibrate_threshold_errors():
    with pytest.raises(ConfigError):
        calibrate_threshold([], fpr=0.01)
    for bad in (0.0, 1.0, -0.1, 2.0):
        with pytest.raises(ConfigError, match="fpr"):
            calibrate_threshold([0.1, 0.2], fpr=bad)


def test_summarize():
    s = summarize(SCORES, LABELS)
    assert isinstance(s, DetectionSummary)
    assert (s.n_pos, s.n_neg) == (2, 3)
    assert s.auc == pytest.approx(5 / 6)
    assert s.tpr_at_1pct == 0.5 and s.tpr_at_01pct == 0.5
    assert len(s.fpr) == len(s.tpr) == 6


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(50), np.zeros(200)].astype(int)
    scores = rng.normal(size=250) + labels
    a, b = summarize(scores, labels), summarize(-scores, labels)
    path = plot_roc({"denoising": a, "reversed": b}, tmp_path / "sub" / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = plot_roc(a, tmp_path / "one.png", log=False)
    assert one.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temporary files left
