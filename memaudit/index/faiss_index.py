"""Nearest-neighbour search over feature vectors with faiss, and its streamed build.

:class:`NeighborIndex` wraps a faiss index for one of two metrics:

``cosine``
    Vectors are L2-normalized and searched by inner product; distances returned are cosine distances
    ``1 - cos(a, b)`` in [0, 2]. A zero vector has cosine similarity 0 with everything (distance 1).
``l2``
    Searched by squared Euclidean distance; distances returned are real Euclidean distances (the square root).

and two kinds: ``exact`` (flat index, brute force) and ``ivf`` (inverted file, ``IndexIVFFlat``: k-means cells,
``nprobe`` of them searched; approximate unless ``nprobe`` equals ``nlist``). ``auto`` picks ``ivf`` from
``ivf_threshold`` vectors on.

The IVF cells are trained on a seeded random sample of at most ``IVF_TRAIN_PER_CELL`` vectors per cell, drawn from
the row numbers of the whole set (:func:`ivf_training_rows`). :meth:`NeighborIndex.stream` builds the same index
from batches whose total is known up front: it decides ``exact`` or ``ivf`` and ``nlist`` from that total, keeps the
sampled rows, spills the vectors that arrive before the last sampled row to a temporary file, trains, and then adds
everything in the same chunks as :meth:`NeighborIndex.add` would (cell assignments are computed in fixed chunks of
``ADD_CHUNK`` rows, aligned on row numbers), so the streamed index equals the one built from all vectors at once.

A built index is saved and loaded checksummed (:meth:`NeighborIndex.save`, :meth:`NeighborIndex.load`, through
:mod:`memaudit.index.store`); :func:`memaudit.index.cache.build_or_load` reuses one built from the same features.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from memaudit.core.errors import ConfigError
from memaudit.index.features import as_feature_array
from memaudit.index.store import INDEX_FORMAT, check_key, read_checked, write_checked

logger = logging.getLogger(__name__)

__all__ = ["ADD_CHUNK", "IVF_TRAIN_PER_CELL", "KINDS", "METRICS", "IndexStream", "NeighborIndex", "default_nprobe",
           "ivf_training_rows"]

METRICS = ("cosine", "l2")
KINDS = ("auto", "exact", "ivf")
IVF_TRAIN_PER_CELL = 64
#: IVF vectors are assigned to cells (and added) in chunks of this many rows, aligned on row numbers, so that an
#: index built batch by batch computes every assignment exactly as one built at once (faiss's distance kernels round
#: differently for different numbers of queries).
ADD_CHUNK = 4096


def default_nprobe(nlist: int) -> int:
    """IVF cells searched per query when ``nprobe`` is not given: 16, or 1/64 of the cells when there are more than
    1,024 of them (at 10^6 vectors the default 4,000 cells give 63; 16 found the nearest of only 84% of fresh
    queries there, in ``benchmarks/speed.py --part nn``)."""
    return max(16, math.ceil(nlist / 64))


def _normalize_rows(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        logger.warning("%d feature vector(s) are all zeros; their cosine similarity is taken as 0", int(zero.sum()))
        norms[zero] = 1.0
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def _gpu_id(device: str) -> int | None:
    """None for the CPU, else the CUDA device number of ``device`` ('cuda' -> 0, 'cuda:1' -> 1)."""
    if device == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"device {device!r} is not supported by the neighbour index; use 'cpu' or 'cuda[:N]'")
    return int(m.group(1) or 0)


class NeighborIndex:
    """A faiss nearest-neighbour index over float32 feature vectors.

    Args:
        metric: ``"cosine"`` (distances ``1 - cos``) or ``"l2"`` (Euclidean distances).
        kind: ``"exact"``, ``"ivf"`` or ``"auto"`` (``ivf`` when the first :meth:`add` has at least
            ``ivf_threshold`` vectors, else ``exact``).
        ivf_threshold: see ``kind``.
        nlist: number of IVF cells; default ``4 * sqrt(N)``, capped at ``N // 39`` so that k-means has enough
            points per cell (at least 1).
        nprobe: IVF cells searched per query (capped at ``nlist``); more is slower and more exact. Default
            ``max(16, ceil(nlist / 64))``: 16 up to 1,024 cells, then a constant 1/64 of them (at 10^6 vectors and
            4,000 cells, 63; ``benchmarks/speed.py --part nn`` measures the recall).
        device: ``"cpu"`` or ``"cuda[:N]"``; CUDA needs a faiss build with GPU support, otherwise a warning is
            logged and the index stays on the CPU.
        seed: seed of the IVF k-means, so that a rebuilt index is the same.
    """

    def __init__(self, metric: str = "cosine", kind: str = "auto", ivf_threshold: int = 100_000,
                 nlist: int | None = None, nprobe: int | None = None, device: str = "cpu", seed: int = 0):
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r} is not supported; choose one of: {', '.join(METRICS)}")
        if kind not in KINDS:
            raise ConfigError(f"index kind {kind!r} is not supported; choose one of: {', '.join(KINDS)}")
        for label, value in (("ivf_threshold", ivf_threshold),) + (() if nprobe is None else (("nprobe", nprobe),)) \
                + (() if nlist is None else (("nlist", nlist),)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{label} must be a positive integer (got {value!r})")
        self.metric = metric
        self.kind = kind  # resolved to "exact" or "ivf" by the first add()
        self.ivf_threshold = int(ivf_threshold)
        self.nlist = None if nlist is None else int(nlist)
        self.device = str(device)
        self.seed = int(seed)
        self._gpu = _gpu_id(self.device)
        self._index: Any = None
        self._dim: int | None = None
        self._nprobe = None if nprobe is None else int(nprobe)  # None: default_nprobe(nlist) once nlist is known

    def __repr__(self) -> str:
        return (f"NeighborIndex(metric={self.metric!r}, kind={self.kind!r}, dim={self._dim}, ntotal={self.ntotal}, "
                f"device={self.device!r})")

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dim(self) -> int | None:
        """Vector dimension; ``None`` before the first :meth:`add`."""
        return self._dim

    @property
    def nprobe(self) -> int | None:
        """IVF cells searched per query (capped at ``nlist``); setting it takes effect on the next search. ``None``
        until an index built with the default has its ``nlist`` (and always for an exact index left at it)."""
        if self._nprobe is None and self.nlist is not None:
            return default_nprobe(self.nlist)
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"nprobe must be a positive integer (got {value!r})")
        self._nprobe = int(value)
        self._apply_nprobe()

    # -- building --------------------------------------------------------------------------------------------------

    def _prepare(self, features: Any, name: str) -> np.ndarray:
        array = as_feature_array(features, name)
        if self._dim is not None and array.shape[1] != self._dim:
            raise ConfigError(f"{name} have dimension {array.shape[1]} but the index holds {self._dim}-dimensional "
                              "vectors; use the same feature extractor for both")
        return _normalize_rows(array) if self.metric == "cosine" else array

    def _faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2

    def _to_device(self, index: Any) -> Any:
        if self._gpu is None:
            return index
        if not hasattr(faiss, "StandardGpuResources"):
            logger.warning("device %s requested for the neighbour index, but this faiss has no GPU support "
                           "(install faiss-gpu); searching on the CPU", self.device)
            self._gpu = None
            return index
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, self._gpu, index)

    def _resolve(self, n: int) -> tuple[str, int | None]:
        """The kind (``exact`` or ``ivf``) and number of cells an index over ``n`` vectors gets."""
        kind = self.kind
        if kind == "auto":
            kind = "ivf" if n >= self.ivf_threshold else "exact"
        if kind == "exact":
            return kind, None
        nlist = self.nlist
        if nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        elif nlist > n:
            raise ConfigError(f"nlist={nlist} is larger than the number of vectors ({n}); choose nlist <= {n}")
        return kind, nlist

    def _create(self, n: int, d: int, train: np.ndarray | None) -> None:
        """Create the faiss index for ``n`` vectors of dimension ``d``; an IVF index is trained on ``train`` (the
        rows :func:`ivf_training_rows` picks)."""
        kind, nlist = self._resolve(n)
        if kind == "exact":
            index = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            index = self._to_device(index)
        else:
            quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, self._faiss_metric())  # the wrapper keeps quantizer alive
            index.cp.seed = self.seed  # seeds the k-means initialization
            # k-means on at most IVF_TRAIN_PER_CELL vectors per cell (faiss's own cap is 256), sampled by
            # ivf_training_rows so that faiss subsamples nothing: at 10^6 vectors and 4,000 cells this trains on a
            # quarter of them, benchmarks/speed.py --part nn measures build and recall
            index.cp.max_points_per_centroid = IVF_TRAIN_PER_CELL
            index.train(train)  # on the CPU, so that the seeded k-means gives the same cells everywhere
            index = self._to_device(index)
            self.nlist = nlist
        self.kind = kind
        self._index = index
        self._dim = d
        self._apply_nprobe()
        logger.info("created %s %s index for %d vectors of dimension %d", kind, self.metric, n, d)

    def _add_vectors(self, data: np.ndarray) -> None:
        """Add prepared vectors; an IVF index gets them in pieces that never cross a multiple of ``ADD_CHUNK``."""
        if self.kind != "ivf":
            self._index.add(data)
            return
        start = 0
        while start < len(data):
            room = ADD_CHUNK - self.ntotal % ADD_CHUNK
            self._index.add(np.ascontiguousarray(data[start:start + room]))
            start += room

    def _apply_nprobe(self) -> None:
        if self.kind == "ivf" and self._index is not None:
            nprobe = min(self.nprobe, self.nlist)  # an IVF index always has its nlist
            if self._gpu is None:
                self._index.nprobe = nprobe
            else:  # GPU indexes take the parameter through the parameter space
                try:
                    faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", nprobe)
                except AttributeError:  # pragma: no cover - depends on the faiss build
                    self._index.nprobe = nprobe

    def add(self, features: torch.Tensor | np.ndarray) -> NeighborIndex:
        """Add ``[N, d]`` vectors (their row numbers continue from :attr:`ntotal`); returns ``self``.

        The first call fixes the dimension and, for ``kind="auto"``/``"ivf"``, trains the IVF cells on a sample of
        these vectors (:func:`ivf_training_rows`). To build from batches, use :meth:`stream`: it gives the same
        index without holding every vector in memory.
        """
        data = self._prepare(features, "features")
        if self._index is None:
            n, d = data.shape
            kind, nlist = self._resolve(n)
            train = data[ivf_training_rows(n, nlist, self.seed)] if kind == "ivf" else None
            self._create(n, d, train)
        self._add_vectors(data)
        return self

    def stream(self, total: int, spill_dir: str | os.PathLike | None = None) -> IndexStream:
        """An :class:`IndexStream` that adds ``total`` vectors to this (empty) index batch by batch.

        ``exact`` or ``ivf`` and ``nlist`` are decided from ``total``, and the result is the index :meth:`add` would
        build from all ``total`` vectors at once. Building an IVF index spills the vectors that arrive before its
        last training row to a temporary file in ``spill_dir`` (default: the system's temporary folder), about
        ``4 * d`` bytes per vector, removed when the stream ends.
        """
        return IndexStream(self, total, spill_dir)

    def vectors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored vectors of rows ``[start, stop)`` as float32 ``[k, d]`` (L2-normalized for ``cosine``)."""
        stop = self.ntotal if stop is None else int(stop)
        if not 0 <= start <= stop <= self.ntotal:
            raise ConfigError(f"rows [{start}, {stop}) are out of range for an index of {self.ntotal} vectors")
        if self._index is None or start == stop:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        cpu = self._cpu_index()
        if self.kind == "ivf":
            faiss.extract_index_ivf(cpu).make_direct_map()
        return np.asarray(cpu.reconstruct_n(int(start), int(stop - start)), dtype=np.float32)

    # -- searching -------------------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed vectors of each query, nearest first.

        Returns:
            ``(distances, indices)``, both ``[Q, k]``: float32 cosine distances (``1 - cos``, clipped to [0, 2]) or
            Euclidean distances, ascending; int64 row numbers in the order of :meth:`add`. Where an IVF search with
            a small ``nprobe`` finds fewer than ``k`` vectors, the index is -1 and the distance ``inf``.
        """
        if self._index is None or self.ntotal == 0:
            raise ConfigError("the neighbour index is empty; add features before searching")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be a positive integer (got {k!r})")
        if k > self.ntotal:
            raise ConfigError(f"k={k} is larger than the number of indexed vectors ({self.ntotal})")
        data = self._prepare(queries, "queries")
        raw, indices = self._index.search(data, int(k))
        raw = np.asarray(raw, dtype=np.float32)
        indices = np.asarray(indices, dtype=np.int64)
        if self.metric == "cosine":
            distances = np.clip(1.0 - raw, 0.0, 2.0)
        else:
            distances = np.sqrt(np.maximum(raw, 0.0))
        missing = indices < 0
        if missing.any():
            distances[missing] = np.inf
        return distances.astype(np.float32, copy=False), indices

    # -- persistence -----------------------------------------------------------------------------------------------

    def _cpu_index(self) -> Any:
        return self._index if self._gpu is None else faiss.index_gpu_to_cpu(self._index)

    def metadata(self, key: str) -> dict[str, Any]:
        """The settings :meth:`save` writes next to the index (with the file's size and digest, and a seal)."""
        return {"format": INDEX_FORMAT, "key": key, "metric": self.metric, "kind": self.kind, "dim": self._dim,
                "ntotal": self.ntotal, "nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed}

    def save(self, folder: str | os.PathLike, key: str) -> Path:
        """Write ``folder/index-<key>.faiss`` and ``folder/index-<key>.json`` atomically; returns the index path.

        The index file is written first and the JSON last, so a complete pair on disk is always consistent; the JSON
        records the index file's size and SHA-256, which :meth:`load` checks.
        """
        check_key(key)
        if self._index is None:
            raise ConfigError("cannot save an empty neighbour index; add features first")
        return write_checked(self._cpu_index(), folder, key, self.metadata(key))

    @classmethod
    def load(cls, folder: str | os.PathLike, key: str, *, nprobe: int | None = None,
             device: str = "cpu") -> NeighborIndex | None:
        """The index saved under ``key`` in ``folder``, or ``None`` if it is absent, unreadable or its metadata do
        not match (another key, format, dimension or size). ``nprobe`` overrides the saved value.

        The index file is hashed before faiss reads it: a file whose size or SHA-256 is not the one its metadata
        record, or metadata whose seal does not match, is logged as a warning naming the file and ``None`` is
        returned, so that the caller rebuilds it."""
        found = read_checked(folder, key, METRICS)
        if found is None:
            return None
        cpu_index, meta = found
        obj = cls(metric=meta["metric"], kind=meta["kind"], nlist=meta.get("nlist"),
                  nprobe=nprobe if nprobe is not None else meta.get("nprobe"), device=device,
                  seed=int(meta.get("seed", 0)))
        obj._index = obj._to_device(cpu_index)
        obj._dim = int(cpu_index.d)
        obj._apply_nprobe()
        return obj


def ivf_training_rows(n: int, nlist: int, seed: int) -> np.ndarray:
    """Row numbers (sorted) of the vectors an IVF index of ``nlist`` cells over ``n`` vectors is trained on: all of
    them up to ``nlist * IVF_TRAIN_PER_CELL``, else that many drawn with ``numpy.random.default_rng(seed)``."""
    size = nlist * IVF_TRAIN_PER_CELL
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


class IndexStream:
    """Adds a known number of vectors to an empty :class:`NeighborIndex` batch by batch (see
    :meth:`NeighborIndex.stream`); :meth:`finish` returns the index, equal to one built from all of them at once.

    An exact index takes each batch as it comes. An IVF index needs its cells before it can take a vector: the
    rows of its training sample (:func:`ivf_training_rows` of ``total``) are copied aside as they pass, and every
    vector until the last of them is written to a temporary file; then the cells are trained and the file is
    replayed. Vectors reach faiss in the chunks :meth:`NeighborIndex.add` uses, so every cell assignment is the same.
    Memory: the training sample (at most ``IVF_TRAIN_PER_CELL`` vectors per cell) and one chunk.
    """

    def __init__(self, index: NeighborIndex, total: int, spill_dir: str | os.PathLike | None = None):
        if not isinstance(index, NeighborIndex):
            raise ConfigError(f"a stream adds to a NeighborIndex, got {type(index).__name__}")
        if index.ntotal or index._index is not None:
            raise ConfigError("a stream builds a new index; the index already holds vectors")
        if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < 1:
            raise ConfigError(f"total must be a positive integer (got {total!r})")
        self.index, self.total, self.count = index, int(total), 0
        self.kind, self.nlist = index._resolve(self.total)
        self._rows = ivf_training_rows(self.total, self.nlist, index.seed) if self.kind == "ivf" else None
        self._spill_dir = None if spill_dir is None else Path(spill_dir)
        self._spill = None
        self._train: np.ndarray | None = None
        self._taken = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._closed = False

    @property
    def trained(self) -> bool:
        """Whether the index exists and takes vectors directly (always for an exact index after the first batch)."""
        return self.index._index is not None

    def add(self, features: torch.Tensor | np.ndarray) -> IndexStream:
        """Add a batch ``[b, d]`` (rows continue from :attr:`count`); returns ``self``."""
        if self._closed:
            raise ConfigError("this index stream is finished; start a new one")
        data = self.index._prepare(features, "features")
        b, d = data.shape
        if self.count + b > self.total:
            raise ConfigError(f"the stream was opened for {self.total} vectors but {self.count + b} were added")
        if self.kind == "exact":
            if self.index._index is None:
                self.index._create(self.total, d, None)
            self.index._add_vectors(data)
        elif self.trained:
            self._push(data)
        else:
            self._collect(data)
        self.count += b
        if self.kind == "ivf" and not self.trained and self._taken == len(self._rows):
            self._train_and_replay()
        return self

    def _collect(self, data: np.ndarray) -> None:
        """Before training: keep the batch's training rows and spill the whole batch."""
        b, d = data.shape
        if self._train is None:
            self._train = np.empty((len(self._rows), d), dtype=np.float32)
            self._spill = tempfile.TemporaryFile(dir=self._spill_dir, prefix="memaudit-index-")
        lo, hi = np.searchsorted(self._rows, [self.count, self.count + b])
        self._train[lo:hi] = data[self._rows[lo:hi] - self.count]
        self._taken = int(hi)
        self._spill.write(memoryview(np.ascontiguousarray(data)).cast("B"))

    def _train_and_replay(self) -> None:
        d = self._train.shape[1]
        self.index._create(self.total, d, self._train)
        self._train = None
        spill, self._spill = self._spill, None
        try:
            spill.seek(0)
            for start in range(0, self.count, ADD_CHUNK):
                rows = min(ADD_CHUNK, self.count - start)
                chunk = np.frombuffer(spill.read(rows * d * 4), dtype=np.float32).reshape(rows, d)
                self._push(chunk)
        finally:
            spill.close()

    def _push(self, data: np.ndarray) -> None:
        """Queue prepared vectors; hand faiss every complete ``ADD_CHUNK`` of row numbers."""
        self._pending.append(data)
        self._pending_rows += len(data)
        room = ADD_CHUNK - self.index.ntotal % ADD_CHUNK
        if self._pending_rows >= room:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_rows = [], 0
        room = ADD_CHUNK - self.index.ntotal % ADD_CHUNK
        whole = room + (len(data) - room) // ADD_CHUNK * ADD_CHUNK if len(data) >= room else 0
        if whole:
            self.index._add_vectors(data[:whole])
        if whole < len(data):
            rest = np.array(data[whole:])
            self._pending, self._pending_rows = [rest], len(rest)

    def finish(self) -> NeighborIndex:
        """Add what is queued and return the index; every one of the ``total`` vectors must have been added."""
        if self._closed:
            raise ConfigError("this index stream is finished; start a new one")
        if self.count != self.total:
            self.close()
            raise ConfigError(f"the stream was opened for {self.total} vectors but {self.count} were added")
        if self.kind == "ivf" and self._pending:
            self.index._add_vectors(np.concatenate(self._pending))
            self._pending, self._pending_rows = [], 0
        self._closed = True
        logger.info("streamed %d vectors into a %s %s index", self.count, self.kind, self.index.metric)
        return self.index

    def close(self) -> None:
        """Drop the temporary file and what is queued (after an error)."""
        self._closed = True
        self._pending, self._train = [], None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> IndexStream:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.close()
