"""The training image nearest to a generation, by exact normalized L2, without the training set in memory.

The extraction attack compares a flagged clique's medoid with the training images (:func:`exact_distances`: the
normalized L2, ``sqrt(mean((x - y)^2))`` over all values). Two lookups answer the same questions, with the same
interface (:class:`ImageLookup`): the distance to one given image, and the nearest image with its distance.

:class:`ExhaustiveLookup` holds a tensor of training images and compares with every one (library users, tests).

:class:`ThumbnailLookup` holds only a faiss index of small per-image *descriptors* (:func:`descriptors`: a thumbnail
of block means, at most 16x16 per channel, and one more value; 3 KB per RGB image) and reads the few candidates it
needs (``read(indices)``, e.g. from disk). Its answer is *exact*: the same index and the same distance as the
exhaustive comparison. Why:

- **a lower bound.** Split an image ``Y`` (``d`` values) into its thumbnail ``PY`` (``D`` means of equal, disjoint
  blocks of ``b`` values, ``d = b D``) and its residual ``RY = Y - up(PY)`` (each value minus its block's mean).
  The two parts are orthogonal (a residual sums to zero over every block), so for two images
  ``|X - Y|^2 = b |PX - PY|^2 + |RX - RY|^2 >= b |PX - PY|^2 + (|RX| - |RY|)^2`` (reverse triangle inequality).
  The descriptor ``v(Y) = [PY, |RY| / sqrt(b)]`` therefore satisfies ``|v(X) - v(Y)|^2 / D <= |X - Y|^2 / d``: the
  descriptor distance divided by ``sqrt(D)`` never exceeds the normalized L2 of the images. (Without the last value
  this is the familiar bound: the mean of squared block means is at most the mean of squares, by Cauchy-Schwarz.)
  Blocks must be equal and disjoint, so the thumbnail side is the largest divisor of the image side up to 16
  (:func:`thumbnail_grid`), not an arbitrary area resize.
- **the search.** Candidates come from an exact faiss L2 search over the descriptors, in increasing descriptor
  distance, ``k`` at a time (``k`` doubles). Each candidate's exact distance is computed from its image, read from
  ``read``. The search stops at the first candidate whose lower bound exceeds the best exact distance found: every
  later candidate, and every image faiss did not return (its descriptor distance is at least the last returned
  one's), is then farther than the best, so the best is the nearest of all.
- **rounding.** faiss computes in float32, and descriptors are stored in float32. The bound subtracts a rigorous
  margin for both (:meth:`ThumbnailLookup.lower_bound`): a float32 dot product of length ``n`` errs by at most
  ``gamma_n |x| |y|`` with ``gamma_n = n u / (1 - n u)``, ``u = 2^-24``. The margin only makes the search read a few
  more candidates; it never makes it stop early.
- **ties.** The exhaustive answer is the lowest index among equal minimal distances (``numpy.argmin``). The search
  stops only when the bound is *strictly* above the best distance, so every image that could equal it is read, and
  among equal distances the lowest index is kept. :func:`exact_distances` gives every pair the same float64 value
  whichever images it is computed with (a per-row numpy pairwise sum), so "equal" means the same in both lookups.

A query whose descriptors say little (e.g. noise against noise: descriptor distances far below the exact distances)
still gets the exact answer, by reading more candidates: up to every image in the worst case.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from memaudit.core.errors import ConfigError
from memaudit.index.faiss_index import NeighborIndex

logger = logging.getLogger(__name__)

__all__ = ["THUMBNAIL_SIDE", "ImageLookup", "ExhaustiveLookup", "ThumbnailLookup", "dataset_reader", "descriptors",
           "downsample", "exact_distances", "thumbnail_grid"]

#: Largest thumbnail side (per channel): 16x16x3 float32 is 3 KB per image.
THUMBNAIL_SIDE = 16
#: Most candidates read from the training set at a time (1 first, then doubling).
READ_GROUP = 8
#: First number of candidates asked from faiss (doubled while needed).
FIRST_K = 8
# values (float64) per chunk of an exhaustive comparison
_CHUNK_VALUES = 1 << 22
_U32 = 2.0 ** -24  # unit roundoff of float32
_U64 = 2.0 ** -53  # unit roundoff of float64


def downsample(images: Tensor, size: int) -> Tensor:
    """``images`` ``[N, C, H, W]`` reduced to ``size x size`` by area averaging (``interpolate(mode="area")``);
    returned as they are when neither side exceeds ``size``. Per image: the result does not depend on the batch."""
    if images.shape[-1] <= size and images.shape[-2] <= size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")


def _largest_divisor(n: int, most: int) -> int:
    return max(k for k in range(1, min(n, most) + 1) if n % k == 0)


def thumbnail_grid(height: int, width: int, side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    """Thumbnail size ``(th, tw)`` of ``height x width`` images: the largest divisors of each side up to ``side``, so
    that every thumbnail value is the mean of an equal, disjoint block (what the lower bound needs)."""
    if height < 1 or width < 1 or side < 1:
        raise ConfigError(f"thumbnails need positive sizes (got {height}x{width}, side {side}).")
    return _largest_divisor(int(height), int(side)), _largest_divisor(int(width), int(side))


def descriptors(images: Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Descriptors of ``images`` ``[k, C, H, W]`` on a thumbnail ``grid`` (``(th, tw)`` dividing ``(H, W)``): the block
    means (``C * th * tw`` values) and the norm of the residual (each value minus its block's mean) divided by the
    square root of the block size; computed in float64, returned as float32 ``[k, C * th * tw + 1]``."""
    k, c, h, w = images.shape
    th, tw = grid
    if h % th or w % tw:
        raise ConfigError(f"a {th}x{tw} thumbnail grid does not divide {h}x{w} images.")
    x = images.detach().to("cpu", torch.float64).numpy().reshape(k, c, th, h // th, tw, w // tw)
    means = x.mean(axis=(3, 5), keepdims=True)
    residual = np.sqrt(((x - means) ** 2).reshape(k, -1).sum(1) / ((h // th) * (w // tw)))
    out = np.concatenate([means.reshape(k, c * th * tw), residual[:, None]], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def exact_distances(query: Tensor, images: Tensor) -> np.ndarray:
    """Normalized L2 of ``query`` ``[C, H, W]`` to each of ``images`` ``[k, C, H, W]``: ``sqrt(mean((x - y)^2))``
    over all values, float64 ``[k]``.

    Each value is a numpy pairwise sum over that image's row alone, so it is the same bits whichever other images
    are compared in the same call (which makes ties between two lookups the same ties).
    """
    q = query.detach().to("cpu", torch.float64).numpy().reshape(-1)
    y = images.detach().to("cpu", torch.float64).numpy().reshape(len(images), -1)
    if y.shape[1] != q.shape[0]:
        raise ConfigError(f"cannot compare an image of {q.shape[0]} values with images of {y.shape[1]} values.")
    diff = y - q
    return np.sqrt((diff * diff).sum(axis=1) / q.shape[0])


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


class ImageLookup(ABC):
    """Training images compared with one query at a time, by :func:`exact_distances`.

    Attributes:
        shape: ``(C, H, W)`` of the images (and of the queries).
    """

    shape: tuple[int, int, int]

    @abstractmethod
    def __len__(self) -> int:
        """Number of training images."""

    @abstractmethod
    def read(self, indices: Sequence[int]) -> Tensor:
        """The images at ``indices``, ``[k, C, H, W]``."""

    def _query(self, query: Tensor) -> Tensor:
        if query.ndim == 4 and query.shape[0] == 1:
            query = query[0]
        if query.ndim != 3 or tuple(query.shape) != tuple(self.shape):
            raise ConfigError(f"a {_shape(query.shape)} query cannot be compared with {_shape(self.shape)} "
                              "training images; give one image of their shape.")
        return query

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < len(self):
            raise ConfigError(f"training image index {index!r} is out of range for {len(self)} training images.")
        return int(index)

    def distance(self, query: Tensor, index: int) -> float:
        """Exact distance of ``query`` (``[C, H, W]`` or ``[1, C, H, W]``) to training image ``index``; reads that
        image only."""
        query = self._query(query)
        index = self._check_index(index)
        return float(exact_distances(query, self.read([index]))[0])

    @abstractmethod
    def nearest(self, query: Tensor) -> tuple[int, float]:
        """``(index, distance)`` of the training image nearest to ``query``; among equal distances the lowest index."""


class ExhaustiveLookup(ImageLookup):
    """Every image of ``images`` ``[N, C, H, W]`` (a tensor in memory) compared with the query."""

    def __init__(self, images: Tensor):
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ConfigError("an exhaustive lookup needs an [N, C, H, W] image tensor.")
        if len(images) == 0:
            raise ConfigError("an exhaustive lookup needs at least one image.")
        self.images = images
        self.shape = tuple(int(s) for s in images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: Sequence[int]) -> Tensor:
        return self.images[list(indices)]

    def nearest(self, query: Tensor) -> tuple[int, float]:
        query = self._query(query)
        rows = max(1, _CHUNK_VALUES // max(1, math.prod(self.shape)))
        best_i, best_d = -1, math.inf
        for start in range(0, len(self.images), rows):
            d = exact_distances(query, self.images[start:start + rows])
            k = int(np.argmin(d))  # the first of equal minima
            if best_i < 0 or d[k] < best_d:  # strictly: an earlier chunk keeps a tie
                best_i, best_d = start + k, float(d[k])
        return best_i, best_d


class ThumbnailLookup(ImageLookup):
    """Training images known by their descriptors (a faiss index, in memory) and read on demand; exact answers (see
    the module's docstring for why).

    Args:
        read: ``read(indices) -> [k, C, H, W]`` float images, the same values the descriptors were made from (for a
            dataset: :func:`dataset_reader`).
        shape: ``(C, H, W)`` of the images ``read`` returns.
        index: an exact L2 :class:`~memaudit.index.NeighborIndex` of their :func:`descriptors`, row ``i`` for
            image ``i``; ``None`` starts empty (fill it with :meth:`add`).

    Attributes:
        images_read: training images read so far (for the log and the tests).
    """

    def __init__(self, read: Callable[[list[int]], Tensor], shape: Sequence[int], index: NeighborIndex | None = None):
        if len(shape) != 3 or any(int(s) < 1 for s in shape):
            raise ConfigError(f"shape must be (C, H, W), got {tuple(shape)!r}.")
        self.shape = tuple(int(s) for s in shape)
        self.grid = thumbnail_grid(self.shape[1], self.shape[2])
        self.values = self.shape[0] * self.grid[0] * self.grid[1]  # thumbnail values D
        self.dim = self.values + 1  # and the residual norm
        self._read = read
        if index is None:
            index = NeighborIndex(metric="l2", kind="exact")
        if index.metric != "l2" or index.kind != "exact":
            raise ConfigError(f"descriptors need an exact l2 index, got {index.kind} {index.metric}.")
        if index.dim is not None and index.dim != self.dim:
            raise ConfigError(f"the descriptor index has dimension {index.dim}, but {_shape(self.shape)} images have "
                              f"{self.dim}-value descriptors.")
        self.index = index
        self.max_sq_norm = 0.0
        for start in range(0, index.ntotal, 1 << 13):  # the largest squared descriptor norm bounds faiss's rounding
            v = index.vectors(start, min(index.ntotal, start + (1 << 13))).astype(np.float64)
            self.max_sq_norm = max(self.max_sq_norm, float((v * v).sum(1).max()))
        self.images_read = 0

    def __len__(self) -> int:
        return self.index.ntotal

    def add(self, images: Tensor) -> ThumbnailLookup:
        """Add the descriptors of ``images`` ``[b, C, H, W]`` (the next rows, in order); returns ``self``."""
        if images.ndim != 4 or tuple(images.shape[1:]) != self.shape:
            raise ConfigError(f"images of shape {_shape(images.shape[1:])} cannot join a lookup of "
                              f"{_shape(self.shape)} images.")
        t = descriptors(images, self.grid)
        if not np.isfinite(t).all():
            raise ConfigError("training images contain NaN or infinite values.")
        self.max_sq_norm = max(self.max_sq_norm, float((t.astype(np.float64) ** 2).sum(1).max()))
        self.index.add(t)
        return self

    def read(self, indices: Sequence[int]) -> Tensor:
        images = self._read(list(indices))
        if tuple(images.shape) != (len(indices), *self.shape):
            raise ConfigError(f"the training-image reader returned shape {tuple(images.shape)} for {len(indices)} "
                              f"images of {_shape(self.shape)}.")
        self.images_read += len(indices)
        return images

    def lower_bound(self, returned: float, query_sq_norm: float) -> float:
        """A value that the computed exact distance of every image whose descriptor distance, as the index returns
        it, is at least ``returned`` never falls below (``query_sq_norm``: the query descriptor's squared norm).

        Rigorous for float32 arithmetic (``n = D + 1`` descriptor values, ``u = 2^-24``): faiss's squared distance
        ``f`` (by ``|x|^2 + |y|^2 - 2 x.y`` or by summed squared differences) is within ``(2 gamma_n + 4u)(|x|^2 +
        |y|^2)`` of the squared distance of the stored descriptors, and the index returns ``fl(sqrt(f))`` (relative
        error ``u``); stored descriptors are float64 values rounded to float32, so their distance is within
        ``1.01 u (|x| + |y|)`` of the real descriptors' distance. Both margins are doubled. The real descriptor
        distance divided by ``sqrt(D)`` is at most the exact distance (module docstring), whose float64 value is
        within ``(C H W + 4) 2^-53`` (relative; doubled) of it.
        """
        n = self.dim
        gamma = n * _U32 / (1 - n * _U32)
        norms_sq = query_sq_norm + self.max_sq_norm
        f = float(returned) ** 2 * (1 - 2 * 2.01 * _U32)
        sq = f - 2 * (2 * gamma + 4 * _U32) * norms_sq
        t = math.sqrt(max(0.0, sq)) - 2 * 1.01 * _U32 * (math.sqrt(query_sq_norm) + math.sqrt(self.max_sq_norm))
        rho = 2 * (math.prod(self.shape) + 4) * _U64
        return max(0.0, t) / math.sqrt(self.values) * (1 - rho)

    def nearest(self, query: Tensor) -> tuple[int, float]:
        query = self._query(query)
        n = len(self)
        if n == 0:
            raise ConfigError("the thumbnail lookup is empty; add the training images first.")
        qt = descriptors(query[None], self.grid)
        if not np.isfinite(qt).all():
            raise ConfigError("the query image contains NaN or infinite values.")
        q_sq = float((qt.astype(np.float64) ** 2).sum())
        best_i, best_d = -1, math.inf
        seen: set[int] = set()
        k, group_size = min(n, FIRST_K), 1  # the first candidate alone: a near copy is often done after one read
        while True:
            returned, rows = self.index.search(qt, k)
            bounds = [self.lower_bound(r, q_sq) for r in returned[0]]  # ascending, like the returned distances
            todo = [(int(i), b) for i, b in zip(rows[0], bounds) if int(i) not in seen]
            pos, stopped = 0, False
            while pos < len(todo):
                if todo[pos][1] > best_d:  # this candidate, every later one and every unreturned image are farther
                    stopped = True
                    break
                group = []
                while pos < len(todo) and len(group) < group_size and todo[pos][1] <= best_d:
                    group.append(todo[pos][0])
                    pos += 1
                group_size = min(READ_GROUP, 2 * group_size)
                for i, d in zip(group, exact_distances(query, self.read(group))):
                    seen.add(i)
                    if d < best_d or (d == best_d and i < best_i):  # ties: the lowest index, as numpy.argmin
                        best_i, best_d = i, float(d)
            if stopped or k == n or bounds[-1] > best_d:  # an unreturned image's bound is >= the last one's
                break
            k = min(n, 2 * k)
        logger.debug("nearest training image %d at %.6f after reading %d of %d", best_i, best_d, len(seen), n)
        return best_i, best_d

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, folder: str | Path, key: str) -> Path:
        """Save the descriptor index under ``key`` in ``folder`` (see :meth:`NeighborIndex.save`)."""
        return self.index.save(folder, key)

    @classmethod
    def load(cls, folder: str | Path, key: str, read: Callable[[list[int]], Tensor], shape: Sequence[int],
             n: int | None = None) -> ThumbnailLookup | None:
        """The lookup saved under ``key``, or ``None`` when it is absent or does not fit ``shape`` (or ``n``
        images)."""
        index = NeighborIndex.load(folder, key)
        if index is None or index.metric != "l2" or index.kind != "exact":
            return None
        grid = thumbnail_grid(int(shape[1]), int(shape[2]))
        if index.dim != int(shape[0]) * grid[0] * grid[1] + 1 or (n is not None and index.ntotal != n):
            return None
        return cls(read, shape, index)


def dataset_reader(dataset, size: int) -> Callable[[list[int]], Tensor]:
    """``read(indices)`` of an :class:`~memaudit.data.ImageCaptionDataset` for a lookup: its images at ``indices``
    in ``[0, 1]``, :func:`downsample`-d to ``size`` (what the extraction attack compares), read now."""

    def read(indices: list[int]) -> Tensor:
        return downsample((dataset.read(indices) + 1) / 2, size)

    return read
