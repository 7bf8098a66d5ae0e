"""Feature vectors as the index takes them: a validated, C-contiguous ``[N, d]`` numpy array."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from memaudit.core.errors import ConfigError

__all__ = ["as_feature_array"]


def as_feature_array(features: Any, name: str = "features", dtype=np.float32) -> np.ndarray:
    """``features`` (tensor or array-like ``[N, d]``) as a C-contiguous numpy array of ``dtype``, validated.

    Raises:
        ConfigError: not two-dimensional, empty, or containing NaN/infinite values.
    """
    if isinstance(features, torch.Tensor):
        array = features.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.float32).numpy()
    else:
        try:
            array = np.asarray(features, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name} must be a numeric [N, d] array or tensor ({e})") from e
    if array.ndim != 2:
        raise ConfigError(f"{name} must have shape [N, d], got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ConfigError(f"{name} is empty (shape {list(array.shape)}); give at least one feature vector")
    if not np.isfinite(array).all():
        raise ConfigError(f"{name} contain NaN or infinite values; check the images and the feature extractor")
    return np.ascontiguousarray(array, dtype=dtype)
