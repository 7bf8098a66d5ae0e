"""The faiss nearest-neighbour index over feature vectors, its streamed build, its on-disk cache, and the exact
nearest-training-image lookup built on it.

- :mod:`memaudit.index.features`: :func:`as_feature_array`, feature vectors as the index takes them;
- :mod:`memaudit.index.store`: a saved index on disk, checksummed and sealed;
- :mod:`memaudit.index.faiss_index`: :class:`NeighborIndex` (cosine or L2, exact or IVF) and :class:`IndexStream`,
  which builds the same index batch by batch;
- :mod:`memaudit.index.cache`: :func:`build_or_load`, an index reused by the content of its features
  (:func:`index_key`);
- :mod:`memaudit.index.lookup`: the training image nearest to a generation by exact normalized L2
  (:class:`ThumbnailLookup`, :class:`ExhaustiveLookup`), without the training set in memory.
"""

from memaudit.index.cache import build_or_load, index_key
from memaudit.index.faiss_index import (
    ADD_CHUNK,
    IVF_TRAIN_PER_CELL,
    KINDS,
    METRICS,
    IndexStream,
    NeighborIndex,
    default_nprobe,
    ivf_training_rows,
)
from memaudit.index.features import as_feature_array
from memaudit.index.lookup import (
    THUMBNAIL_SIDE,
    ExhaustiveLookup,
    ImageLookup,
    ThumbnailLookup,
    dataset_reader,
    descriptors,
    downsample,
    exact_distances,
    thumbnail_grid,
)

__all__ = ["ADD_CHUNK", "IVF_TRAIN_PER_CELL", "KINDS", "METRICS", "THUMBNAIL_SIDE", "ExhaustiveLookup", "ImageLookup",
           "IndexStream", "NeighborIndex", "ThumbnailLookup", "as_feature_array", "build_or_load", "dataset_reader",
           "default_nprobe", "descriptors", "downsample", "exact_distances", "index_key", "ivf_training_rows",
           "thumbnail_grid"]
