"""Image quality of generated images against real images: FID and KID in a pluggable feature space.

Both metrics compare two sets of feature vectors. The feature space comes from the feature registry
(:func:`memaudit.features.get_extractor`), like torchmetrics' ``feature=`` argument: ``inception`` gives the usual
FID/KID (2048-d pool features of the FID Inception-v3 network), ``pixels`` a cheap weight-free baseline, and any
registered name or ``nn.Module`` another space. Numbers are only comparable within one feature space.

``FID`` (Heusel et al. 2017)
    The Frechet distance between Gaussians fitted to the two sets,
    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. It is biased: at small sample sizes it is inflated, and the
    bias depends on the number of images, so FIDs from sets of different sizes are not comparable.
``KID`` (Binkowski et al. 2018)
    The unbiased estimate of the squared maximum mean discrepancy with the polynomial kernel
    ``k(x, y) = (gamma x.y + coef)^degree`` (``gamma`` = 1/dim by default), averaged over random subsets. Being
    unbiased, it is the number to compare with fewer than about 1,000 images; it may be slightly negative.

The pure functions :func:`fid_from_features` and :func:`kid_from_features` work on ``[N, dim]`` arrays or tensors;
:func:`quality` extracts features from image tensors first. All arithmetic is in float64.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

from memaudit.core.errors import ConfigError
from memaudit.features import FeatureExtractor, get_extractor
from memaudit.index import as_feature_array

logger = logging.getLogger(__name__)

__all__ = ["QualityResult", "fid_from_features", "kid_from_features", "quality", "KID_RECOMMENDED_BELOW",
           "METRICS"]

#: Below this many images in the smaller set, :func:`quality` recommends KID over FID.
KID_RECOMMENDED_BELOW = 1000

#: Metric names accepted by :func:`quality`.
METRICS = ("kid", "fid")

_FID_EPS = 1e-6  # added to both covariance diagonals when their product is singular, as pytorch-fid does
_IMAG_ATOL = 1e-3  # largest imaginary part on the diagonal of sqrtm(S1 S2) taken as numerical noise (pytorch-fid)


def _as_float64(features: Any, name: str) -> np.ndarray:
    """``features`` (tensor or array-like ``[N, d]``) as a float64 numpy array, validated."""
    return as_feature_array(features, name, dtype=np.float64)


def _check_pair(real: Any, fake: Any, metric: str) -> tuple[np.ndarray, np.ndarray]:
    real_array = _as_float64(real, "real features")
    fake_array = _as_float64(fake, "fake features")
    if real_array.shape[1] != fake_array.shape[1]:
        raise ConfigError(f"real and fake features have different dimensions ({real_array.shape[1]} vs "
                          f"{fake_array.shape[1]}); extract both with the same feature extractor")
    for name, array in (("real", real_array), ("fake", fake_array)):
        if array.shape[0] < 2:
            raise ConfigError(f"{metric} needs at least 2 {name} samples, got {array.shape[0]}; give more images")
    return real_array, fake_array


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root, quiet about singular inputs (the caller checks the result)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            result = scipy.linalg.sqrtm(matrix)
    if isinstance(result, tuple):  # older scipy with disp=False semantics
        result = result[0]
    return np.asarray(result)


def _sqrtm_usable(covmean: np.ndarray) -> bool:
    if not np.isfinite(covmean).all():
        return False
    if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
        return False
    return True


def fid_from_features(real: np.ndarray | Tensor, fake: np.ndarray | Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N1, d]`` and ``[N2, d]``.

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64, with sample covariances (``ddof=1``). The matrix
    square root is :func:`scipy.linalg.sqrtm`; if it fails (non-finite, or a product that is numerically singular
    leaves large imaginary parts) it is retried with ``1e-6 * I`` added to both covariances, as the reference
    implementation (pytorch-fid) does. Tiny imaginary parts are numerical noise and are dropped.

    Raises:
        ConfigError: fewer than 2 samples in a set, mismatched dimensions, non-finite values.
    """
    real_array, fake_array = _check_pair(real, fake, "FID")
    mu1, mu2 = real_array.mean(axis=0), fake_array.mean(axis=0)
    sigma1 = np.atleast_2d(np.cov(real_array, rowvar=False, ddof=1))
    sigma2 = np.atleast_2d(np.cov(fake_array, rowvar=False, ddof=1))
    diff = mu1 - mu2

    covmean = _sqrtm(sigma1 @ sigma2)
    if not _sqrtm_usable(covmean):
        logger.info("FID: covariance product is singular; adding %g to the covariance diagonals", _FID_EPS)
        offset = np.eye(sigma1.shape[0]) * _FID_EPS
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ConfigError("FID: the matrix square root of the feature covariances is not finite even after "
                              "regularization; use more images or a lower-dimensional feature extractor")
    if np.iscomplexobj(covmean):
        largest = float(np.max(np.abs(covmean.imag))) if covmean.size else 0.0
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=_IMAG_ATOL):
            logger.warning("FID: the matrix square root has imaginary parts up to %.3g; using its real part "
                           "(the value may be inaccurate: use more images than feature dimensions)", largest)
        covmean = covmean.real
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return value


def _poly_kernel(a: np.ndarray, b: np.ndarray, degree: int, gamma: float, coef: float) -> np.ndarray:
    return (gamma * (a @ b.T) + coef) ** degree


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef: float) -> float:
    """Unbiased MMD^2 between equal-size samples ``x`` and ``y`` (``m`` rows each) with the polynomial kernel."""
    m = x.shape[0]
    k_xx = _poly_kernel(x, x, degree, gamma, coef)
    k_yy = _poly_kernel(y, y, degree, gamma, coef)
    k_xy = _poly_kernel(x, y, degree, gamma, coef)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def kid_from_features(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, subsets: int = 100,
                      subset_size: int = 1000, degree: int = 3, gamma: float | None = None, coef: float = 1.0,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) between feature sets ``[N1, d]`` and ``[N2, d]``.

    The unbiased MMD^2 estimate with the polynomial kernel ``k(x, y) = (gamma x.y + coef)^degree`` (``gamma``
    defaults to ``1/d``), computed on ``subsets`` pairs of random subsets of ``m = min(subset_size, N1, N2)`` rows
    each, drawn without replacement (independently for real and fake, and for each subset) with
    ``numpy.random.default_rng(seed)``. Same inputs and seed give the same value.

    Returns:
        ``(mean, std)`` over the subsets; ``std`` uses ``ddof=1`` like torchmetrics (0.0 for a single subset).
        The mean can be slightly negative, since the estimator is unbiased.

    Raises:
        ConfigError: fewer than 2 samples in a set, mismatched dimensions, bad settings.
    """
    real_array, fake_array = _check_pair(real, fake, "KID")
    subsets = _positive_int(subsets, "KID subsets")
    subset_size = _positive_int(subset_size, "KID subset_size", minimum=2)
    degree = _positive_int(degree, "KID kernel degree")
    dim = real_array.shape[1]
    if gamma is None:
        gamma = 1.0 / dim
    elif isinstance(gamma, bool) or not np.isfinite(gamma) or gamma <= 0:
        raise ConfigError(f"KID kernel gamma must be a positive number or None for 1/dim (got {gamma!r})")
    if isinstance(coef, bool) or not np.isfinite(coef):
        raise ConfigError(f"KID kernel coef must be a finite number (got {coef!r})")
    n_real, n_fake = real_array.shape[0], fake_array.shape[0]
    m = min(subset_size, n_real, n_fake)
    if m < subset_size:
        logger.debug("KID: subsets of %d samples (fewer images than subset_size=%d)", m, subset_size)
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = real_array[rng.choice(n_real, size=m, replace=False)]
        y = fake_array[rng.choice(n_fake, size=m, replace=False)]
        scores[i] = _unbiased_mmd2(x, y, degree, float(gamma), float(coef))
    std = float(scores.std(ddof=1)) if subsets > 1 else 0.0
    return float(scores.mean()), std


@dataclass
class QualityResult:
    """FID/KID of generated (``fake``) images against real images in one feature space.

    Attributes:
        fid: Frechet distance, or ``None`` if not requested.
        kid_mean: mean KID over the subsets, or ``None`` if not requested.
        kid_std: standard deviation of KID over the subsets, or ``None`` if not requested.
        n_real: number of real images.
        n_fake: number of generated images.
        feature_extractor: name of the feature extractor (values are comparable only within one).
        recommended: ``"kid"`` when the smaller set has fewer than 1,000 images, else ``"fid"``.
        note: one sentence explaining the recommendation.
    """

    fid: float | None
    kid_mean: float | None
    kid_std: float | None
    n_real: int
    n_fake: int
    feature_extractor: str
    recommended: str
    note: str


def _check_metrics(metrics: Any) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    try:
        names = tuple(metrics)
    except TypeError:
        raise ConfigError(f"metrics must be a list of names from: {', '.join(METRICS)} (got {metrics!r})") from None
    if not names:
        raise ConfigError(f"metrics is empty; choose at least one of: {', '.join(METRICS)}")
    for name in names:
        if not isinstance(name, str) or name.strip().lower() not in METRICS:
            raise ConfigError(f"unknown quality metric {name!r}; choose from: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(name.strip().lower() for name in names))


def _check_images(images: Any, name: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise ConfigError(f"{name} must be a torch tensor [N, C, H, W] in [0, 1], got {type(images).__name__}")
    if images.ndim != 4:
        raise ConfigError(f"{name} must have shape [N, C, H, W], got {list(images.shape)}")
    return images


def recommendation(n_real: int, n_fake: int, computed: tuple[str, ...] = METRICS) -> tuple[str, str]:
    """Which of KID and FID to compare at these sample sizes, and one sentence saying why."""
    if min(n_real, n_fake) < KID_RECOMMENDED_BELOW:
        recommended = "kid"
        note = ("FID is biased at small sample sizes; with fewer than 1,000 images KID (unbiased) is the number to "
                "compare")
    else:
        recommended = "fid"
        note = ("with at least 1,000 images per set FID is stable enough to compare (at equal sample sizes and in "
                "the same feature space)")
    if recommended not in computed:
        note += f"; {recommended.upper()} was not computed (add it to metrics)"
    return recommended, note


def quality(real_images: Tensor, fake_images: Tensor, features: str | nn.Module | FeatureExtractor = "pixels",
            device: str | torch.device = "cpu", metrics: tuple[str, ...] = ("kid", "fid"), seed: int = 0,
            batch_size: int = 64, kid_subsets: int = 100, kid_subset_size: int = 1000,
            **feature_options: Any) -> QualityResult:
    """FID and/or KID of generated images against real images.

    Args:
        real_images: float ``[N, C, H, W]`` in [0, 1].
        fake_images: float ``[M, C, H, W]`` in [0, 1], with the same ``C`` as ``real_images``.
        features: feature extractor: a registered name (``"inception"`` for the standard FID/KID, ``"pixels"``
            for a weight-free baseline, ...), an ``nn.Module`` or a built :class:`FeatureExtractor`.
        device: where the feature extractor runs.
        metrics: which of ``"kid"``, ``"fid"`` to compute.
        seed: seed of the KID subset sampling.
        batch_size: images per forward pass of the feature extractor.
        kid_subsets: number of KID subsets.
        kid_subset_size: KID subset size (capped at the smaller set's size).
        **feature_options: options of the feature extractor (e.g. ``size=16`` for ``pixels``, ``weights=PATH``
            for ``inception``).

    Raises:
        ConfigError: channel mismatch, unknown metric, fewer than 2 images, bad feature settings.
    """
    names = _check_metrics(metrics)
    real_images = _check_images(real_images, "real images")
    fake_images = _check_images(fake_images, "fake images")
    if real_images.shape[1] != fake_images.shape[1]:
        raise ConfigError(f"real and fake images have different channel counts ({real_images.shape[1]} vs "
                          f"{fake_images.shape[1]}); convert both to RGB (or both to grayscale) first")
    n_real, n_fake = int(real_images.shape[0]), int(fake_images.shape[0])
    for name, n in (("real", n_real), ("fake", n_fake)):
        if n < 2:
            raise ConfigError(f"quality needs at least 2 {name} images, got {n}; give more images")

    extractor = get_extractor(features, device=device, batch_size=batch_size, **feature_options)
    real_features = extractor(real_images)
    fake_features = extractor(fake_images)
    logger.info("quality: %d real and %d fake images, %s features (dim %s)", n_real, n_fake, extractor.name,
                extractor.dim)

    fid = kid_mean = kid_std = None
    if "fid" in names:
        fid = fid_from_features(real_features, fake_features)
    if "kid" in names:
        kid_mean, kid_std = kid_from_features(real_features, fake_features, subsets=kid_subsets,
                                              subset_size=kid_subset_size, seed=seed)

    recommended, note = recommendation(n_real, n_fake, names)
    return QualityResult(fid=fid, kid_mean=kid_mean, kid_std=kid_std, n_real=n_real, n_fake=n_fake,
                         feature_extractor=extractor.name, recommended=recommended, note=note)
