"""AMD: the average minimum cosine distance from generated images to the training set.

For generated features ``g_i`` and training features ``t_j``,

    AMD = mean_i min_j (1 - cos(g_i, t_j))

A low AMD means generated images sit close to training images (a sign of memorization); 0 means every generated
image has an exact (up to scale) copy among the training features. :func:`amd` uses a faiss
:class:`~memaudit.index.NeighborIndex`; :func:`amd_bruteforce` is the plain numpy reference used to cross-check
it. :class:`AMDAccumulator` computes the same value from batches fed one at a time, so an audit need not keep its
generated images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memaudit.core.errors import ConfigError
from memaudit.index import NeighborIndex, as_feature_array

__all__ = ["AMDResult", "amd", "amd_bruteforce", "AMDAccumulator"]


@dataclass
class AMDResult:
    """AMD of a generated set.

    Attributes:
        amd: mean over generated images of the minimum cosine distance to any training image.
        per_image: ``[N]`` minimum cosine distance of each generated image.
        nearest: ``[N]`` row number of each generated image's nearest training image.
    """

    amd: float
    per_image: np.ndarray
    nearest: np.ndarray

    def __len__(self) -> int:
        return int(self.per_image.shape[0])


def _check_index(index: NeighborIndex) -> None:
    if not isinstance(index, NeighborIndex):
        raise ConfigError(f"index must be a NeighborIndex, got {type(index).__name__}")
    if index.metric != "cosine":
        raise ConfigError(f"AMD needs a cosine neighbour index, got metric {index.metric!r}")
    if index.ntotal == 0:
        raise ConfigError("the training index is empty; add the training features first")


def _result(per_image: np.ndarray, nearest: np.ndarray) -> AMDResult:
    per_image = np.asarray(per_image, dtype=np.float64)
    return AMDResult(amd=float(per_image.mean()), per_image=per_image, nearest=np.asarray(nearest, dtype=np.int64))


def amd(generated_features: torch.Tensor | np.ndarray, training_features: torch.Tensor | np.ndarray | None = None,
        index: NeighborIndex | None = None) -> AMDResult:
    """AMD of ``generated_features`` ``[N, d]`` against the training set.

    Give either ``training_features`` ``[M, d]`` (an index is built from them: exact below 100,000 vectors) or a
    prebuilt cosine ``index`` (e.g. from :func:`memaudit.index.build_or_load`), not both.
    """
    if (training_features is None) == (index is None):
        raise ConfigError("amd() needs exactly one of training_features or index")
    if index is None:
        index = NeighborIndex(metric="cosine").add(training_features)
    _check_index(index)
    distances, nearest = index.search(as_feature_array(generated_features, "generated features"), k=1)
    return _result(distances[:, 0], nearest[:, 0])


def amd_bruteforce(generated: torch.Tensor | np.ndarray, training: torch.Tensor | np.ndarray,
                   chunk: int = 1024) -> AMDResult:
    """AMD computed in float64 numpy by comparing every pair: the reference that :func:`amd` is checked against.

    Rows are L2-normalized (all-zero rows are left at zero: similarity 0), similarities are matrix products, and
    ties go to the lowest training row. Memory is ``chunk * M`` floats at a time.
    """
    g = as_feature_array(generated, "generated features").astype(np.float64)
    t = as_feature_array(training, "training features").astype(np.float64)
    if g.shape[1] != t.shape[1]:
        raise ConfigError(f"generated features have dimension {g.shape[1]} but training features {t.shape[1]}; use "
                          "the same feature extractor for both")

    def unit(x: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)

    g, t = unit(g), unit(t)
    per_image = np.empty(g.shape[0])
    nearest = np.empty(g.shape[0], dtype=np.int64)
    for start in range(0, g.shape[0], chunk):
        sims = g[start:start + chunk] @ t.T
        best = sims.argmax(axis=1)
        nearest[start:start + chunk] = best
        per_image[start:start + chunk] = np.clip(1.0 - sims[np.arange(len(best)), best], 0.0, 2.0)
    return _result(per_image, nearest)


class AMDAccumulator:
    """AMD over generated batches fed one at a time against a fixed training ``index`` (a cosine NeighborIndex).

    ``update(batch)`` returns that batch's per-image distances; ``result()`` gives the :class:`AMDResult` of all
    batches so far, in the order they were fed (``nearest`` refers to training rows).
    """

    def __init__(self, index: NeighborIndex):
        _check_index(index)
        self.index = index
        self._distances: list[np.ndarray] = []
        self._nearest: list[np.ndarray] = []

    @property
    def count(self) -> int:
        """Number of generated images fed so far."""
        return int(sum(d.shape[0] for d in self._distances))

    def update(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Add a batch ``[B, d]`` of generated features; returns their ``[B]`` minimum cosine distances."""
        distances, nearest = self.index.search(as_feature_array(features, "generated features"), k=1)
        batch = np.asarray(distances[:, 0], dtype=np.float64)
        self._distances.append(batch)
        self._nearest.append(np.asarray(nearest[:, 0], dtype=np.int64))
        return batch.copy()

    def result(self) -> AMDResult:
        """The AMD of every batch fed so far."""
        if not self._distances:
            raise ConfigError("no generated features were given to the AMD accumulator; call update() first")
        return _result(np.concatenate(self._distances), np.concatenate(self._nearest))
