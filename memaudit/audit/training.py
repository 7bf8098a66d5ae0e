"""The training set as the audit compares with it: the faiss index of its features (AMD) and the thumbnail lookup of
its images (the medoid check), built in one streamed pass and cached by content (:func:`cache_key`)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from memaudit.audit.config import AuditConfig, Progress
from memaudit.index import NeighborIndex, ThumbnailLookup, dataset_reader, downsample, thumbnail_grid

__all__ = ["cache_key", "feature_batch", "is_cuda", "training_indexes"]

logger = logging.getLogger("memaudit.audit")  # the audit's one logger, as before it was a package


def cache_key(dataset, what: str) -> str:
    """Key of something computed from every training image (``what`` says what and how): from the dataset's
    :meth:`~memaudit.data.ImageCaptionDataset.content_key`, so no pixel is read to find a cached index."""
    return hashlib.sha256(f"{dataset.content_key()}|{what}".encode()).hexdigest()[:16]


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def feature_batch(extractor) -> int:
    """Images per streamed batch: the extractor's own batch size, so that it sees the same batches as when it was
    given the whole set at once (the same features, bit for bit)."""
    return int(getattr(extractor, "batch_size", 64))


def training_indexes(dataset, extractor, config: AuditConfig, cache_dir: Path, device: str, progress: Progress):
    """The faiss index of the training features (AMD) and the :class:`~memaudit.index.ThumbnailLookup` of the
    training images at the extraction size (the medoid check), loaded from ``cache_dir`` or built in one streamed
    pass over ``dataset``: a batch of images is in memory at a time, never the set."""
    n = len(dataset)
    side = min(dataset.resolution, config.extraction_size)  # what downsample() leaves of a training image
    shape = (dataset.channels, side, side)
    read = dataset_reader(dataset, config.extraction_size)
    grid = thumbnail_grid(side, side)
    feature_key = cache_key(dataset, f"features:{extractor.name}:{json.dumps(config.feature_options, sort_keys=True)}")
    thumb_key = cache_key(dataset, f"descriptors:v1:{shape}:{grid}")
    index = NeighborIndex.load(cache_dir, feature_key)
    if index is not None and index.ntotal != n:
        index = None
    lookup = ThumbnailLookup.load(cache_dir, thumb_key, read, shape, n=n)
    reused = {"training_features": "cache" if index is not None else "computed",
              "training_thumbnails": "cache" if lookup is not None else "computed", "training_images": n}
    logger.info("training features: %s, thumbnails: %s (%d images, %s)", reused["training_features"],
                reused["training_thumbnails"], n, cache_dir)
    progress("training features", 0, n)
    if index is None or lookup is None:
        stream = (NeighborIndex(metric="cosine", device=device).stream(n, spill_dir=cache_dir)
                  if index is None else None)
        building = ThumbnailLookup(read, shape) if lookup is None else None
        try:
            for _, images in dataset.batches(feature_batch(extractor), pin_memory=is_cuda(device),
                                             progress=lambda d, t: progress("training features", d, t)):
                images01 = (images + 1) / 2
                if stream is not None:
                    stream.add(extractor(images01))
                if building is not None:
                    building.add(downsample(images01, config.extraction_size))
        except BaseException:
            if stream is not None:
                stream.close()
            raise
        if stream is not None:
            index = stream.finish()
            index.save(cache_dir, feature_key)
        if building is not None:
            lookup = building
            lookup.save(cache_dir, thumb_key)
    progress("training features", n, n)
    return index, lookup, reused
