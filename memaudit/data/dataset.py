"""The dataset: an index of image files (or in-memory pixels), read in batches by DataLoader workers.

:class:`ImageCaptionDataset` holds captions, names and either image files or pixels; it is split, subset, keyed by
content (:meth:`~ImageCaptionDataset.image_keys`) and compared with another set (:meth:`~ImageCaptionDataset.overlap`).
:func:`from_arrays` builds one from in-memory images.
"""

from __future__ import annotations

import hashlib
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memaudit.core.digests import digest_many
from memaudit.core.errors import DataError
from memaudit.data.decode import DECODE_VERSION, load_image, strict_image_loading

__all__ = ["ImageCaptionDataset", "default_workers", "from_arrays", "large_buffers_from_mmap"]


def large_buffers_from_mmap() -> None:
    """Make glibc serve every block of 1 MiB or more with mmap, so it goes back to the system when freed.

    By default glibc raises its mmap threshold each time a large block is freed; after that, each batch's multi-MB
    pixel buffers come from the heap, which fragments, and the resident memory of a pass over the training set grows
    with the number of batches read. Measured on a 4,000-image pass at 512 px: about 100 KB more peak RSS per image
    (2,124 MB at the end against 1,703 MB with the threshold fixed), while the index itself takes 15 KB per image.
    Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``) keeps the pass flat. Elsewhere than glibc: nothing to do.
    """
    global _MALLOC_FIXED
    if _MALLOC_FIXED:
        return
    _MALLOC_FIXED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):  # not glibc
        pass


_MALLOC_FIXED = False


def default_workers() -> int:
    """Decoding worker processes of a loader: one core is left to the computation, at most 4 are used."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


# --------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------


class ImageCaptionDataset:
    """Images with captions: an index of files on disk, or pixels held in memory (:func:`from_arrays`).

    Attributes:
        captions: one caption per image.
        names: one unique name per image (the file path as written in the captions file, or an id).
        source: where the data came from (a path), for reports.
        images: the pixels ``[N, C, H, W]`` in ``[-1, 1]`` of an in-memory dataset; ``None`` for one on disk, whose
            pixels are only ever read in batches (:meth:`read`, :meth:`batches`).
        files: the image paths of a dataset on disk (``None`` in memory).

    ``digests`` passes the files' SHA-256 digests when they are known (:meth:`file_digests` of another dataset of the
    same files), so that a copy sent to another process or machine does not read the files again to know them.
    """

    def __init__(self, captions: Sequence[str], names: Sequence[str], source: str = "", *,
                 images: torch.Tensor | None = None, files: Sequence[Path] | None = None,
                 resolution: int | None = None, channels: int | None = None,
                 digests: Sequence[str] | None = None):
        self.captions = list(captions)
        self.names = [str(n) for n in names]
        self.source = source
        self.images = images
        self.files = [Path(f) for f in files] if files is not None else None
        self._digests: list[str] | None = list(digests) if digests is not None else None
        self._keys: list[str] | None = None
        where = source or ("arrays" if images is not None else "files")
        if (images is None) == (files is None):
            raise DataError("a dataset holds either in-memory images or image files; pass exactly one of them.")
        if images is not None:
            if not isinstance(images, torch.Tensor) or images.ndim != 4:
                shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
                raise DataError(f"Dataset images must be a tensor of shape [N, C, H, W]; got {shape}.")
            n = int(images.shape[0])
            self._resolution, self._channels = int(images.shape[2]), int(images.shape[1])
        else:
            n = len(self.files)
            if resolution is None or channels not in (1, 3):
                raise DataError("a dataset of image files needs the resolution and channels (1 or 3) to read them.")
            if self._digests is not None and (len(self._digests) != n or not all(
                    isinstance(d, str) and len(d) == 64 for d in self._digests)):
                raise DataError(f"Dataset from {where} needs one SHA-256 digest (64 hex digits) per file.")
            self._resolution, self._channels = int(resolution), int(channels)
        if len(self.captions) != n or len(self.names) != n:
            raise DataError(
                f"Dataset from {where} has {n} images, {len(self.captions)} captions and "
                f"{len(self.names)} names; pass one caption and one name per image."
            )
        bad = next((i for i, c in enumerate(self.captions) if not isinstance(c, str)), None)
        if bad is not None:
            raise DataError(
                f"Caption {bad} of the dataset from {where} is a "
                f"{type(self.captions[bad]).__name__}, not a string; pass captions as strings."
            )
        dup = _first_duplicate(self.names)
        if dup is not None:
            raise DataError(f"Dataset from {where} has the name {dup!r} more than once; names must be unique.")

    # -- size and shape ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.captions)

    @property
    def channels(self) -> int:
        """Number of channels C (1 for grayscale, 3 for RGB)."""
        return self._channels

    @property
    def resolution(self) -> int:
        """Side length of the (square) images as read."""
        return self._resolution

    @property
    def on_disk(self) -> bool:
        return self.files is not None

    def __repr__(self) -> str:
        kind = "files" if self.on_disk else "in memory"
        return (f"ImageCaptionDataset(n={len(self)}, channels={self.channels}, size={self.resolution}, {kind}, "
                f"source={self.source!r})")

    # -- pixels --------------------------------------------------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The images at ``indices``, float32 ``[k, C, H, W]`` in ``[-1, 1]``, decoded now (in this process)."""
        idx = self._indices(indices)
        if self.images is not None:
            return self.images.index_select(0, torch.tensor(idx, dtype=torch.long))
        out = torch.empty((len(idx), self.channels, self.resolution, self.resolution), dtype=torch.float32)
        mode = "L" if self.channels == 1 else "RGB"
        with strict_image_loading():
            for k, i in enumerate(idx):
                out[k] = load_image(self.files[i], mode, self.resolution)
        return out

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """Return ``(image [C, H, W], caption)`` of item ``i`` (negative indices count from the end)."""
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for a dataset of {n} images")
        return self.read([i % n])[0], self.captions[i]

    def batches(self, batch_size: int = 64, indices: Sequence[int] | None = None, *, workers: int | None = None,
                pin_memory: bool = False, progress: Callable[[int, int], None] | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(indices [b], images [b, C, H, W])`` over ``indices`` (default: all), in order, ``batch_size`` at a
        time. Files are decoded by ``workers`` DataLoader processes (default :func:`default_workers`; 0 decodes in
        this process) ahead of the caller, so decoding overlaps the caller's computation; ``pin_memory`` for a CUDA
        consumer. ``progress(done, total)`` after each batch. Only a few batches are in memory at once."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1 (got {batch_size}).")
        large_buffers_from_mmap()
        idx = self._indices(range(len(self)) if indices is None else indices)
        total, done = len(idx), 0
        chunks = [idx[k : k + batch_size] for k in range(0, total, batch_size)]
        if self.images is not None or not chunks:
            source = ((torch.tensor(c, dtype=torch.long), self.read(c)) for c in chunks)
        else:
            workers = default_workers() if workers is None else workers
            workers = min(workers, len(chunks) - 1)  # one batch is decoded faster than a worker starts
            loader = torch.utils.data.DataLoader(
                _FileReader(self.files, self.channels, self.resolution), batch_sampler=chunks,
                num_workers=max(0, workers), collate_fn=_collate, pin_memory=pin_memory,
                worker_init_fn=_worker_init, prefetch_factor=2 if workers > 0 else None,
                persistent_workers=False)
            source = (_raise_failure(b) for b in loader)
        for index, images in source:
            done += len(index)
            yield index, images
            if progress is not None:
                progress(done, total)

    def to_pil(self, i: int) -> Image.Image:
        """Return image ``i`` as an 8-bit PIL image (mode ``"L"`` for 1 channel, ``"RGB"`` for 3)."""
        x, _ = self[i]
        u8 = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if u8.shape[0] == 1:
            return Image.fromarray(u8[0].numpy(), mode="L")
        return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), mode="RGB")

    # -- identity ------------------------------------------------------------------------------------------------------
    def file_digests(self, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """The SHA-256 of each image file, in order (:func:`memaudit.core.digests.digest_many`: a full read the first
        time, then a ``stat`` per file while the file is unchanged); computed once per dataset object."""
        if self.files is None:
            raise DataError("an in-memory dataset has no image files to digest; use image_keys().")
        if self._digests is None:
            try:
                self._digests = digest_many(self.files, progress=progress)
            except OSError as e:
                raise DataError(f"Cannot read image {e.filename}: {e.strerror or e}; check that the dataset's "
                                "files are still there.") from e
        return self._digests

    def image_keys(self) -> list[str]:
        """A key per image that changes when the image does and only then: for a file, its content digest
        (:meth:`file_digests`), so that an edited file is another image whatever its modification time and a
        copied or moved file keeps its key, with :data:`DECODE_VERSION`; in memory, a hash of its pixels. The
        resolution and channels are part of every key."""
        if self._keys is None:
            shape = f"{self.channels}x{self.resolution}"
            if self.files is not None:
                self._keys = [hashlib.sha256(f"{d}|{shape}|decode={DECODE_VERSION}".encode()).hexdigest()[:32]
                              for d in self.file_digests()]
            else:
                arr = self.images.numpy()
                self._keys = [hashlib.sha256(arr[i].tobytes() + shape.encode()).hexdigest()[:32]
                              for i in range(len(self))]
        return self._keys

    def content_key(self, captions: bool = False) -> str:
        """A key of the whole set (in order): its image keys, and its captions when ``captions``."""
        h = hashlib.sha256("\n".join(self.image_keys()).encode())
        if captions:
            h.update(b"\0" + "\n".join(self.captions).encode())
        return h.hexdigest()

    def overlap(self, other: ImageCaptionDataset) -> list[int]:
        """The indices (ascending) of ``other``'s images that are also images of this set: same image key (the same
        file bytes, or the same in-memory pixels, read at the same resolution and channels), wherever they are."""
        mine = set(self.image_keys())
        return [i for i, key in enumerate(other.image_keys()) if key in mine]

    # -- parts ---------------------------------------------------------------------------------------------------------
    def _indices(self, indices) -> list[int]:
        idx = [operator.index(i) for i in np.asarray(list(indices) if isinstance(indices, range) else indices,
                                                      dtype=np.int64).reshape(-1).tolist()]
        n = len(self)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise DataError(f"Subset index {bad[0]} is out of range for a dataset of {n} images; use 0..{n - 1}.")
        return [i % n for i in idx] if n else idx

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageCaptionDataset:
        """Return a new dataset with the items at ``indices``, in that order (no pixel is read)."""
        idx = self._indices(indices)
        common = dict(captions=[self.captions[i] for i in idx], names=[self.names[i] for i in idx], source=self.source)
        if self.images is not None:
            return ImageCaptionDataset(**common, images=self.images.index_select(0, torch.tensor(idx, dtype=torch.long)))
        digests = [self._digests[i] for i in idx] if self._digests is not None else None
        return ImageCaptionDataset(**common, files=[self.files[i] for i in idx], resolution=self.resolution,
                                   channels=self.channels, digests=digests)

    def content_groups(self) -> np.ndarray:
        """Per item, the index of its distinct image (same image key: a copy of the same bytes or pixels), numbered in
        the order of first appearance; with no copies, ``arange(len(self))``."""
        first: dict[str, int] = {}
        return np.array([first.setdefault(key, len(first)) for key in self.image_keys()], dtype=np.int64)

    def distinct(self) -> tuple[ImageCaptionDataset, np.ndarray]:
        """One item per distinct image (:meth:`content_groups`), the first of its copies, in order, and those items'
        indices here; with no copies, this dataset itself and ``arange(len(self))``."""
        # groups are numbered in the order of first appearance, so their first items come in order
        first = np.unique(self.content_groups(), return_index=True)[1]
        if len(first) == len(self):
            return self, first
        return self.subset(first), first

    def split(self, seed: int = 0, val: float = 0.1, test: float = 0.1,
              by_content: bool = False) -> dict[str, ImageCaptionDataset]:
        """Split into disjoint ``"train"``, ``"val"`` and ``"test"`` parts that together cover every item.

        The parts get ``round(val * N)`` and ``round(test * N)`` items, drawn with
        ``numpy.random.default_rng(seed).permutation``; the rest is ``"train"``. Items keep their original order
        within each part. The same seed always gives the same split. With ``by_content``, N counts distinct images
        (:meth:`content_groups`) and every copy of an image goes to its image's part, so that no image is in two
        parts; with no copies that is the same split.
        """
        if val < 0 or test < 0 or val + test >= 1:
            raise DataError(
                f"Split fractions val={val} and test={test} are invalid; each must be >= 0 and their sum below 1."
            )
        groups = self.content_groups() if by_content else np.arange(len(self))
        n = int(groups.max()) + 1 if len(groups) else 0
        n_val, n_test = round(float(val) * n), round(float(test) * n)
        perm = np.random.default_rng(seed).permutation(n)
        part = np.zeros(n, dtype=np.int64)  # 0 train, 1 val, 2 test
        part[perm[:n_test]], part[perm[n_test : n_test + n_val]] = 2, 1
        item_part = part[groups]
        return {name: self.subset(np.flatnonzero(item_part == k)) for k, name in enumerate(("train", "val", "test"))}


class _FileReader(torch.utils.data.Dataset):
    """What a loader worker decodes: one image file per item. A failure travels back as a message (a worker's
    exception would reach the caller wrapped in a multi-line traceback)."""

    def __init__(self, files: list[Path], channels: int, resolution: int):
        self.files, self.mode, self.resolution = files, ("L" if channels == 1 else "RGB"), resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with strict_image_loading():
                return i, load_image(self.files[i], self.mode, self.resolution), None
        except DataError as e:
            return i, None, str(e)


def _collate(items):
    failed = next((msg for _, _, msg in items if msg is not None), None)
    if failed is not None:
        return None, failed
    return torch.tensor([i for i, _, _ in items], dtype=torch.long), torch.stack([x for _, x, _ in items])


def _raise_failure(batch):
    index, images = batch
    if index is None:
        raise DataError(images)
    return index, images


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a decoding worker must not compete with the caller's threads
    large_buffers_from_mmap()


# --------------------------------------------------------------------------------------------------------------
# From arrays
# --------------------------------------------------------------------------------------------------------------


def from_arrays(
    images: np.ndarray | torch.Tensor,
    captions: Sequence[str],
    names: Sequence[str] | None = None,
    source: str = "arrays",
) -> ImageCaptionDataset:
    """Build a dataset from in-memory images.

    Args:
        images: numpy array or tensor shaped ``[N, H, W]`` (grayscale), ``[N, C, H, W]`` or ``[N, H, W, C]``
            with C in {1, 3} (channels-first is assumed when both readings fit). Integer arrays hold 0..255,
            float arrays hold values in ``[0, 1]``.
        captions: one caption per image.
        names: one unique name per image; defaults to ``"0"``, ``"1"``, ...
        source: description of where the arrays came from, for reports.
    """
    t = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4:
        if t.shape[1] in (1, 3):
            pass
        elif t.shape[3] in (1, 3):
            t = t.permute(0, 3, 1, 2)
        else:
            raise DataError(
                f"Images from {source} have shape {tuple(t.shape)}; expected [N, C, H, W] or [N, H, W, C] with "
                "1 or 3 channels."
            )
    else:
        raise DataError(
            f"Images from {source} have shape {tuple(t.shape)}; expected [N, H, W], [N, C, H, W] or [N, H, W, C]."
        )

    if t.dtype == torch.bool or t.is_complex():
        raise DataError(f"Images from {source} have dtype {t.dtype}; pass uint8 (0..255) or float (0..1).")
    if t.is_floating_point():
        f = t.to(torch.float32)
        if f.numel() and (not torch.isfinite(f).all() or f.min() < 0 or f.max() > 1):
            raise DataError(
                f"Float images from {source} must hold values in [0, 1] (got {f.min().item():g}.."
                f"{f.max().item():g}); scale them or pass uint8 0..255."
            )
        out = f * 2.0 - 1.0
    else:
        if t.numel() and (t.min() < 0 or t.max() > 255):
            raise DataError(
                f"Integer images from {source} must hold values 0..255 (got {t.min().item()}..{t.max().item()}); "
                "pass uint8 or float 0..1."
            )
        out = t.to(torch.float32) / 127.5 - 1.0

    n = out.shape[0]
    captions = list(captions)
    if len(captions) != n:
        raise DataError(f"Got {n} images but {len(captions)} captions from {source}; pass one caption per image.")
    names_list = [str(i) for i in range(n)] if names is None else [str(x) for x in names]
    if len(names_list) != n:
        raise DataError(f"Got {n} images but {len(names_list)} names from {source}; pass one name per image.")
    return ImageCaptionDataset(captions, names_list, source, images=out.contiguous())


def _first_duplicate(items: Sequence[str]) -> str | None:
    """Return the first item that occurs twice, or None."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None
