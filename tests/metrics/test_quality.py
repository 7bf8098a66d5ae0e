"""Known-answer tests of memaudit.metrics.quality (FID, KID)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from memaudit.core.errors import ConfigError
from memaudit.metrics.quality import QualityResult, fid_from_features, kid_from_features, quality


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------- FID

def test_fid_of_a_set_against_itself_is_zero():
    x = _rng(1).normal(size=(200, 16))
    assert abs(fid_from_features(x, x)) < 1e-4
    assert abs(fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(x).float())) < 1e-4


def test_fid_of_a_shifted_set_is_the_squared_shift():
    # Shifting every row by c leaves the covariance unchanged: FID = ||c||^2 exactly.
    x = _rng(2).normal(size=(300, 4)) @ np.diag([1.0, 2.0, 0.5, 3.0])
    c = np.array([1.0, -2.0, 0.5, 3.0])
    assert fid_from_features(x, x + c) == pytest.approx(float(c @ c), abs=1e-6)  # 14.25


def test_fid_of_scaled_gaussian_one_dimension():
    # 1-D: FID = (mu1 - mu2)^2 + (s1 - s2)^2 with s the sample standard deviations (ddof=1).
    x = _rng(3).normal(size=(100, 1))
    y = 3.0 * x + 2.0
    s1 = x.std(ddof=1)
    expected = (2.0 + 2.0 * x.mean()) ** 2 + (3.0 * s1 - s1) ** 2
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-9)


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = _rng(4)
    real = rng.normal(size=(400, 8))
    fake = rng.normal(loc=0.3, size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5
    mu1, mu2 = torch.from_numpy(real.mean(0)), torch.from_numpy(fake.mean(0))
    s1 = torch.from_numpy(np.cov(real, rowvar=False, ddof=1))
    s2 = torch.from_numpy(np.cov(fake, rowvar=False, ddof=1))
    expected = float(_compute_fid(mu1, s1, mu2, s2))
    assert expected > 1.0
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-3)


def test_fid_singular_covariance_is_finite():
    # Fewer samples than dimensions: covariances are singular; the value must still be finite and >= ~0.
    rng = _rng(5)
    real, fake = rng.normal(size=(10, 32)), rng.normal(size=(12, 32))
    value = fid_from_features(real, fake)
    assert np.isfinite(value) and value > 0


def test_fid_validation():
    x = _rng(6).normal(size=(10, 4))
    with pytest.raises(ConfigError, match="at least 2"):
        fid_from_features(x[:1], x)
    with pytest.raises(ConfigError, match="different dimensions"):
        fid_from_features(x, x[:, :3])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        fid_from_features(bad, x)


# ---------------------------------------------------------------------------------------------------------------- KID

def _naive_kid(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with a polynomial kernel, written as plain double loops."""
    m, d = x.shape
    gamma = 1.0 / d if gamma is None else gamma

    def k(a, b):
        return (gamma * float(np.dot(a, b)) + coef) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_separates_far_sets_from_near_sets():
    rng = _rng(7)
    x = rng.normal(size=(200, 16))
    far = rng.normal(loc=3.0, size=(200, 16))
    near = x + 0.01 * rng.normal(size=x.shape)
    kid_far, _ = kid_from_features(x, far, subsets=10, subset_size=100)
    kid_near, _ = kid_from_features(x, near, subsets=10, subset_size=100)
    # Rows shared by the two subsets make the near value slightly negative (about -0.08 here); far is about 990.
    assert kid_far > 100.0
    assert abs(kid_near) < 0.5
    assert kid_far > 1000 * abs(kid_near)


def test_kid_of_a_set_against_itself_has_the_exact_small_value():
    # With x = y (one subset holding the whole set) the unbiased estimate is exactly
    # 2 (S - D) / (m (m - 1)) - 2 S / m^2, S = sum of the kernel matrix, D = its trace: O(1/m), slightly negative.
    x = _rng(8).normal(size=(200, 16))
    m = len(x)
    kernel = (x @ x.T / 16 + 1.0) ** 3
    s, d = kernel.sum(), np.trace(kernel)
    expected = 2 * (s - d) / (m * (m - 1)) - 2 * s / m**2
    mean, std = kid_from_features(x, x, subsets=3, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-9)
    assert -0.2 < mean < 0 and std < 1e-12


def test_kid_of_two_samples_of_one_distribution_is_near_zero():
    # Independent samples: the unbiased estimator is centred on 0 (can be slightly negative).
    rng = _rng(13)
    x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    mean, _ = kid_from_features(x, y, subsets=1, subset_size=200)
    assert abs(mean) < 5e-2  # estimator noise at m = 200, d = 16 is about 0.02
    far, _ = kid_from_features(x, y + 0.5, subsets=1, subset_size=200)
    assert far > 10 * abs(mean) and far > 0.5


def test_kid_matches_torchmetrics_on_one_full_subset():
    from torchmetrics.image.kid import poly_mmd

    rng = _rng(9)
    real, fake = rng.normal(size=(60, 8)), rng.normal(loc=0.5, size=(60, 8))
    expected = float(poly_mmd(torch.from_numpy(real), torch.from_numpy(fake)))
    mean, std = kid_from_features(real, fake, subsets=1, subset_size=60)
    assert expected > 0.01
    assert mean == pytest.approx(expected, rel=1e-4)
    assert std == 0.0
    expected_g = float(poly_mmd(torch.from_numpy(real), torch.from_numpy(fake), degree=2, gamma=0.5, coef=0.3))
    mean_g, _ = kid_from_features(real, fake, subsets=1, subset_size=60, degree=2, gamma=0.5, coef=0.3)
    assert mean_g == pytest.approx(expected_g, rel=1e-4)


def test_kid_matches_naive_double_loop():
    rng = _rng(10)
    real, fake = rng.normal(size=(12, 5)), rng.normal(loc=0.7, size=(12, 5))
    mean, _ = kid_from_features(real, fake, subsets=1, subset_size=100)  # subset = whole sets (m = 12)
    assert mean == pytest.approx(_naive_kid(real, fake), rel=1e-9)


def test_kid_is_deterministic_for_a_seed_and_varies_across_seeds():
    rng = _rng(11)
    real, fake = rng.normal(size=(80, 6)), rng.normal(loc=0.4, size=(80, 6))
    a = kid_from_features(real, fake, subsets=5, subset_size=20, seed=3)
    b = kid_from_features(real, fake, subsets=5, subset_size=20, seed=3)
    c = kid_from_features(real, fake, subsets=5, subset_size=20, seed=4)
    assert a == b
    assert a != c
    assert a[1] > 0


def test_kid_validation():
    x = _rng(12).normal(size=(10, 4))
    with pytest.raises(ConfigError, match="at least 2"):
        kid_from_features(x, x[:1])
    with pytest.raises(ConfigError, match="subsets"):
        kid_from_features(x, x, subsets=0)
    with pytest.raises(ConfigError, match="gamma"):
        kid_from_features(x, x, gamma=-1.0)


# ------------------------------------------------------------------------------------------------------------ quality

def _images(n: int, seed: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_quality_on_pixels():
    real = _images(50, 0)
    result = quality(real, real, features="pixels", size=4, kid_subsets=10)
    assert isinstance(result, QualityResult)
    assert abs(result.fid) < 1e-4
    assert abs(result.kid_mean) < 5e-2
    assert result.n_real == result.n_fake == 50
    assert result.feature_extractor == "pixels"
    assert result.recommended == "kid"
    assert "FID is biased at small sample sizes" in result.note

    fake = (real * 0.5 + 0.5).clamp(0, 1)  # washed out: a clearly different distribution
    other = quality(real, fake, features="pixels", size=4, kid_subsets=10)
    assert other.fid > 1.0 and other.kid_mean > result.kid_mean + 0.1


def test_quality_metrics_selection_and_custom_module():
    real, fake = _images(20, 1), _images(20, 2)
    only_fid = quality(real, fake, features="pixels", size=4, metrics=("fid",))
    assert only_fid.kid_mean is None and only_fid.kid_std is None and only_fid.fid is not None
    assert "not computed" in only_fid.note
    only_kid = quality(real, fake, features=nn.Flatten(), metrics=("kid",), kid_subsets=3)
    assert only_kid.fid is None and only_kid.kid_mean is not None
    assert only_kid.feature_extractor.startswith("custom:")


def test_quality_validation():
    real = _images(10, 3)
    with pytest.raises(ConfigError, match="channel"):
        quality(real, _images(10, 4, channels=1))
    with pytest.raises(ConfigError, match="kid, fid"):
        quality(real, real, metrics=("kid", "is"))
    with pytest.raises(ConfigError, match="at least 2"):
        quality(real, real[:1])
    with pytest.raises(ConfigError):
        quality(real, real, features="no-such-extractor")
