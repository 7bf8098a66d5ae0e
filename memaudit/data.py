"""Image-caption datasets: indexes of image files (or in-memory arrays), read in batches.

A dataset on disk is an *index*: file paths, captions and names. Each image is known by its content (the SHA-256 of
its file, :mod:`memaudit.core.digests`), so an edited image is another image whatever its modification time, and a
copied or moved dataset keeps its keys. Pixels are decoded on demand, in batches, by a
:class:`torch.utils.data.DataLoader` whose worker processes decode while the caller computes
(:meth:`ImageCaptionDataset.batches`), so memory does not grow with the number of images. Images of any size are
brought to the model's resolution by the rule of diffusers' training scripts: the shorter side is resized to the
resolution (bicubic) and the centre is cropped. Pixels are float32 in ``[-1, 1]`` (the range Stable Diffusion's VAE
expects). :func:`from_arrays` builds an in-memory dataset (tests, the demo); it behaves the same.

Every image mode PIL opens decodes to the picture its 8-bit conversion shows (:func:`to_8bit`): 16-bit images
(``I;16*``, and ``I`` read from a 16-bit file) are scaled so that 65535 is white, 32-bit integers by their type's
maximum, 32-bit floats are read as ``[0, 1]`` when all their values lie there and as ``[0, 255]`` (PIL's own
convention) otherwise; transparency is dropped, as for ``RGBA``: the colour channels are kept as stored (palette
images with transparency, ``PA``, ``LA``; premultiplied ``RGBa``/``La`` are un-premultiplied first).

:func:`load_dataset` reads one of three on-disk layouts, checked in this order:

1. ``path`` is a ``.csv`` or ``.jsonl`` captions file; image paths in it are relative to its folder.
2. ``path`` is a folder holding ``captions.csv`` or ``captions.jsonl`` (or the file named by ``captions_file``).
3. ``path`` is a folder of images, each with a same-named ``.txt`` caption (``a.png`` + ``a.txt``).

A CSV captions file needs a header row with the columns ``file`` and ``caption`` (others are ignored); a JSONL file
holds one object per line with the keys ``file`` and ``caption``. Every user mistake raises
:class:`~memaudit.core.errors.DataError` with a one-line message naming the offending file or line: the captions and
every image's header are checked when the dataset is loaded, before anything is written; a file that fails only at
full decode is named when it is read, and the reader stops there.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import operator
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile

from memaudit.core.digests import digest_many
from memaudit.core.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["DECODE_VERSION", "IMAGE_EXTENSIONS", "ImageCaptionDataset", "default_workers", "from_arrays",
           "large_buffers_from_mmap", "load_dataset", "native_channels", "to_8bit"]

#: File extensions (lower case) treated as images in a folder of images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

#: How a file becomes pixels (:func:`to_8bit` and the resize); part of every file's image key, so that a change of
#: the decoding (version 2: 16-bit, 32-bit and float images scaled to their range) re-encodes cached entries.
DECODE_VERSION = 2

_CAPTION_FILES = ("captions.csv", "captions.jsonl")
_MAX_LISTED = 5


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
        with _strict_image_loading():
            for k, i in enumerate(idx):
                out[k] = _load_image(self.files[i], mode, self.resolution)
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

    def split(self, seed: int = 0, val: float = 0.1, test: float = 0.1) -> dict[str, ImageCaptionDataset]:
        """Split into disjoint ``"train"``, ``"val"`` and ``"test"`` parts that together cover every item.

        The parts get ``round(val * N)`` and ``round(test * N)`` items, drawn with
        ``numpy.random.default_rng(seed).permutation``; the rest is ``"train"``. Items keep their original order
        within each part. The same seed always gives the same split.
        """
        if val < 0 or test < 0 or val + test >= 1:
            raise DataError(
                f"Split fractions val={val} and test={test} are invalid; each must be >= 0 and their sum below 1."
            )
        n = len(self)
        n_val, n_test = round(float(val) * n), round(float(test) * n)
        perm = np.random.default_rng(seed).permutation(n)
        test_idx = np.sort(perm[:n_test])
        val_idx = np.sort(perm[n_test : n_test + n_val])
        train_idx = np.sort(perm[n_test + n_val :])
        return {"train": self.subset(train_idx), "val": self.subset(val_idx), "test": self.subset(test_idx)}


class _FileReader(torch.utils.data.Dataset):
    """What a loader worker decodes: one image file per item. A failure travels back as a message (a worker's
    exception would reach the caller wrapped in a multi-line traceback)."""

    def __init__(self, files: list[Path], channels: int, resolution: int):
        self.files, self.mode, self.resolution = files, ("L" if channels == 1 else "RGB"), resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with _strict_image_loading():
                return i, _load_image(self.files[i], self.mode, self.resolution), None
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


# --------------------------------------------------------------------------------------------------------------
# From disk
# --------------------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | os.PathLike[str],
    resolution: int,
    channels: int,
    *,
    captions_file: str | None = None,
) -> ImageCaptionDataset:
    """Index images and captions on disk, to be read resized and center-cropped to ``resolution`` x ``resolution``.

    The captions are parsed and every image's header is read (its format and size) now; no pixel is decoded until
    the dataset is read (:meth:`ImageCaptionDataset.batches`).

    Args:
        path: a ``.csv``/``.jsonl`` captions file, a folder holding one, or a folder of images with ``.txt``
            captions (see the module docstring).
        resolution: side length of the square images as read (>= 1).
        channels: 1 (grayscale, PIL mode ``"L"``) or 3 (``"RGB"``).
        captions_file: captions file to use when ``path`` is a folder, relative to it or absolute.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise DataError(f"resolution must be a positive integer, got {resolution!r}; pass e.g. resolution=512.")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}.")
    paths, files, captions, source = _resolve_files(path, captions_file)
    with _strict_image_loading():
        for p in paths:
            _check_header(p)
    logger.info("Indexed %d images from %s (read at %dx%d, %d channel(s))", len(paths), source, resolution,
                resolution, channels)
    return ImageCaptionDataset(captions, files, str(source), files=paths, resolution=int(resolution),
                               channels=channels)


def _check_header(path: Path) -> None:
    """Open ``path`` as an image and read its header (format, size), without decoding its pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    # PIL signals broken files with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # DecompressionBombError, struct.error...); any of them means the file cannot be used.
    except Exception as e:
        raise DataError(f"Image {path} is unreadable ({type(e).__name__}: {e}); replace or remove it.") from e
    if w < 1 or h < 1:
        raise DataError(f"Image {path} has size {w}x{h}; replace or remove it.")


def _resolve_files(path: str | os.PathLike[str], captions_file: str | None) -> tuple[list[Path], list[str], list[str], Path]:
    """Image paths, names as written, captions and the source file/folder of a dataset on disk (validated)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"Dataset path {root} does not exist; pass a folder of images or a .csv/.jsonl captions file.")

    if root.is_file():
        if captions_file is not None:
            raise DataError(
                f"Dataset path {root} is a file, so captions_file={captions_file!r} cannot apply; pass the folder "
                "as the path, or drop captions_file."
            )
        if root.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(
                f"Dataset path {root} is not a .csv or .jsonl captions file; pass such a file or a folder of images."
            )
        files, captions = _read_captions_file(root)
        base, source = root.parent, root
    elif root.is_dir():
        cap = _find_captions_file(root, captions_file)
        if cap is not None:
            files, captions = _read_captions_file(cap)
            base, source = cap.parent, cap
        else:
            files, captions = _read_image_folder(root)
            base, source = root, root
    else:
        raise DataError(f"Dataset path {root} is neither a file nor a folder; pass a folder or a captions file.")

    paths = [base / f for f in files]
    missing = [f for f, p in zip(files, paths) if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} image file(s) listed in {source} are missing: {_list_some(missing)}; fix the paths "
            f"(relative to {base}) or remove those entries."
        )

    return paths, files, captions, source


_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def native_channels(path: str | os.PathLike[str], *, captions_file: str | None = None, sample: int = 16) -> int:
    """1 if the dataset's images are grayscale, 3 if they are colour, judged from (up to) ``sample`` files.

    Lets a caller notice a training set whose channels differ from the model's before silently converting it.
    """
    paths, _, _, _ = _resolve_files(path, captions_file)
    modes = set()
    with _strict_image_loading():
        for p in paths[:sample]:
            try:
                with Image.open(p) as im:
                    modes.add(im.mode)
            except Exception as e:
                raise DataError(f"Image {p} is unreadable ({type(e).__name__}: {e}); replace or remove it.") from e
    return 1 if modes and modes <= _GRAY_MODES else 3


def _find_captions_file(root: Path, captions_file: str | None) -> Path | None:
    """Return the captions file to use for folder ``root``, or None when it has none."""
    if captions_file is not None:
        cap = Path(captions_file).expanduser()
        cap = cap if cap.is_absolute() else root / cap
        if not cap.is_file():
            raise DataError(f"Captions file {cap} does not exist; check captions_file (relative to {root}).")
        if cap.suffix.lower() not in (".csv", ".jsonl"):
            raise DataError(f"Captions file {cap} must end in .csv or .jsonl; rename it or pass another file.")
        return cap
    found = [root / name for name in _CAPTION_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise DataError(
            f"Folder {root} holds both captions.csv and captions.jsonl; pass captions_file to say which to use."
        )
    return found[0] if found else None


def _read_captions_file(path: Path) -> tuple[list[str], list[str]]:
    """Read ``(files, captions)`` from a .csv or .jsonl captions file."""
    try:
        if path.suffix.lower() == ".csv":
            files, captions = _read_csv(path)
        else:
            files, captions = _read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"Captions file {path} is not valid UTF-8 ({e.reason}); save it as UTF-8.") from e
    except OSError as e:
        raise DataError(f"Cannot read captions file {path}: {e.strerror or e}; check its permissions.") from e
    if not files:
        raise DataError(f"Captions file {path} has no entries; add one entry per image with 'file' and 'caption'.")
    seen: dict[str, str] = {}
    for f in files:
        key = os.path.normpath(f)
        if key in seen:
            raise DataError(f"Captions file {path} lists the image {f!r} more than once; keep one entry per image.")
        seen[key] = f
    return files, captions


def _read_csv(path: Path) -> tuple[list[str], list[str]]:
    """Parse a CSV captions file with a header row holding ``file`` and ``caption``."""
    files: list[str] = []
    captions: list[str] = []
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, skipinitialspace=True)
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)  # skip blank lines before the header
        if header is None:
            raise DataError(f"Captions file {path} is empty; add a header row 'file,caption' and one row per image.")
        columns = [h.strip() for h in header]
        lacking = [c for c in ("file", "caption") if c not in columns]
        if lacking:
            raise DataError(
                f"Captions file {path} lacks the column(s) {', '.join(lacking)} (found: "
                f"{', '.join(repr(c) for c in columns)}); its header row must name 'file' and 'caption'."
            )
        i_file, i_cap = columns.index("file"), columns.index("caption")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            line = reader.line_num
            if len(row) > len(columns):
                raise DataError(
                    f"Captions file {path} line {line} has {len(row)} fields but the header has {len(columns)}; "
                    'a caption that contains a comma must be quoted, e.g. a.png,"a red car, parked".'
                )
            file = row[i_file].strip() if i_file < len(row) else ""
            caption = row[i_cap].strip() if i_cap < len(row) else ""
            if not file:
                raise DataError(f"Captions file {path} has an empty 'file' on line {line}; fill it in or drop the row.")
            if not caption:
                raise DataError(
                    f"Captions file {path} has an empty caption on line {line} (file {file}); write a caption "
                    "or drop the row."
                )
            files.append(file)
            captions.append(caption)
    return files, captions


def _read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    """Parse a JSONL captions file: one ``{"file": ..., "caption": ...}`` object per line."""
    files: list[str] = []
    captions: list[str] = []
    with path.open("r", encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"Captions file {path} line {line_no} is not valid JSON ({e.msg}); write one JSON object per line."
                ) from e
            if not isinstance(obj, dict):
                raise DataError(
                    f"Captions file {path} line {line_no} is a JSON {type(obj).__name__}, not an object; write "
                    '{"file": ..., "caption": ...}.'
                )
            lacking = [k for k in ("file", "caption") if k not in obj]
            if lacking:
                raise DataError(
                    f"Captions file {path} line {line_no} lacks the key(s) {', '.join(lacking)} (found: "
                    f"{', '.join(repr(k) for k in obj) or 'none'}); each line needs 'file' and 'caption'."
                )
            file, caption = obj["file"], obj["caption"]
            if not isinstance(file, str) or not file.strip():
                raise DataError(
                    f"Captions file {path} line {line_no} has an empty or non-string 'file'; give the image path."
                )
            if not isinstance(caption, str):
                raise DataError(
                    f"Captions file {path} line {line_no} has a non-string caption ({type(caption).__name__}); "
                    "write it as a JSON string."
                )
            if not caption.strip():
                raise DataError(
                    f"Captions file {path} has an empty caption on line {line_no} (file {file.strip()}); write a "
                    "caption or drop the line."
                )
            files.append(file.strip())
            captions.append(caption.strip())
    return files, captions


def _read_image_folder(root: Path) -> tuple[list[str], list[str]]:
    """Read ``(files, captions)`` from a folder of images with same-named ``.txt`` captions (not recursive)."""
    images = sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise DataError(
            f"Folder {root} has no captions.csv, captions.jsonl or images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images with .txt captions or a captions file."
        )
    uncaptioned = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if uncaptioned:
        raise DataError(
            f"{len(uncaptioned)} image(s) in {root} have no .txt caption: {_list_some(uncaptioned)}; add a "
            "same-named .txt file (a.png + a.txt) for each, or use a captions.csv."
        )
    captions: list[str] = []
    for p in images:
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"Caption file {txt} is not valid UTF-8 ({e.reason}); save it as UTF-8.") from e
        except OSError as e:
            raise DataError(f"Cannot read caption file {txt}: {e.strerror or e}; check its permissions.") from e
        if not caption:
            raise DataError(f"Caption file {txt} is empty; write a caption for {p.name}.")
        captions.append(caption)
    return [p.name for p in images], captions


@contextlib.contextmanager
def _strict_image_loading() -> Iterator[None]:
    """Make PIL refuse truncated images for the duration of the block, then restore the previous setting."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


#: 8-bit modes whose transparency is dropped on the way to ``L`` or ``RGB``, through this straight-alpha mode
_ALPHA_VIA = {"P": "RGBA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}


def _integer_full_scale(im: Image.Image) -> int:
    """The value that is white in a 32-bit integer (``I``) image: the maximum of the file's sample type. PIL reads
    16-bit PNG, PGM and TIFF samples into ``I`` too: those (and any file that does not declare its sample size)
    are 16-bit, 65535."""
    tags = getattr(im, "tag_v2", None)
    bits = sample_format = None
    if tags is not None:
        bits, sample_format = tags.get(258), tags.get(339)  # BitsPerSample, SampleFormat
        bits = bits[0] if isinstance(bits, tuple) else bits
        sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    if bits is None or int(bits) <= 16:
        return 65535
    return 2 ** (int(bits) - 1) - 1 if sample_format == 2 else 2 ** int(bits) - 1


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` (any mode PIL opens) as the 8-bit image its proper conversion shows, in a mode that converts to ``L``
    and ``RGB`` without loss of meaning.

    - ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: ``round(v / 257)`` (65535 is white).
    - ``I`` (32-bit integers): scaled by the file's sample maximum (:func:`_integer_full_scale`: 65535 for the
      16-bit files PIL reads as ``I``), negative values black.
    - ``F`` (32-bit floats): ``[0, 1]`` to ``[0, 255]`` when every value lies in ``[0, 1]``, else read as
      ``[0, 255]`` like PIL's own conversion; values outside are clipped. A NaN or infinite value is an error.
    - palette images (with or without transparency), ``PA``, premultiplied ``RGBa`` and ``La``: through ``RGBA`` /
      ``LA`` (colours as stored; the alpha is dropped by the final conversion, as for ``RGBA`` files).
    - every other mode (``1``, ``L``, ``LA``, ``RGB``, ``RGBA``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) is
      8-bit already and left to PIL's conversion.

    Raises:
        ValueError: a float image holds NaN or infinite values.
    """
    mode = im.mode
    if mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        scaled = np.clip(arr, 0, None) * (255.0 / _integer_full_scale(im))
        return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8), mode="L")
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("a 32-bit float image holds NaN or infinite values")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8), mode="L")
    if mode in _ALPHA_VIA:
        return im.convert(_ALPHA_VIA[mode])
    return im


def _load_image(path: Path, mode: str, resolution: int) -> torch.Tensor:
    """Load one image as float32 ``[C, resolution, resolution]`` in ``[-1, 1]`` (shorter side resized, centre crop):
    :func:`to_8bit`, then converted to ``mode`` (``L`` or ``RGB``)."""
    try:
        with Image.open(path) as im:
            im.load()
            img = to_8bit(im).convert(mode)
    # PIL signals broken files with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # DecompressionBombError, struct.error...); any of them means the file cannot be used.
    except Exception as e:
        raise DataError(
            f"Image {path} is unreadable or truncated ({type(e).__name__}: {e}); replace or remove it."
        ) from e
    w, h = img.size
    if w < 1 or h < 1:
        raise DataError(f"Image {path} has size {w}x{h}; replace or remove it.")
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    arr = arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1)
    return arr.to(torch.float32) / 127.5 - 1.0


def _first_duplicate(items: Sequence[str]) -> str | None:
    """Return the first item that occurs twice, or None."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _list_some(items: Sequence[str]) -> str:
    """Join up to five items, saying how many more there are."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def mismatch(dataset: ImageCaptionDataset, target) -> str | None:
    """What keeps ``dataset``'s images from being ``target``'s (channels, resolution), as a message; None if nothing."""
    if dataset.channels != target.image_channels:
        return (f"the training set has {dataset.channels}-channel images but the model generates "
                f"{target.image_channels}-channel images; load the data with channels={target.image_channels}.")
    if dataset.resolution != target.resolution:
        return (f"the training images are {dataset.resolution} px but the model generates {target.resolution} px; "
                f"load the data at resolution={target.resolution}.")
    return None


def dataset_for_target(train, target, convert_channels: bool = False) -> tuple[ImageCaptionDataset, str]:
    """``train`` (a dataset, or a folder/captions file) checked against or loaded for ``target``'s images.

    Returns the dataset and a description of its source. A folder whose images have another channel count than the
    model's is an error unless ``convert_channels``.
    """
    if isinstance(train, ImageCaptionDataset):
        problem = mismatch(train, target)
        if problem:
            raise DataError(problem)
        return train, train.source or "in-memory dataset"
    channels = native_channels(train)
    if channels != target.image_channels and not convert_channels:
        kind = {1: "grayscale", 3: "colour"}
        raise DataError(f"the training images in {train} are {kind[channels]} ({channels} channel(s)) but the model "
                        f"generates {kind[target.image_channels]} images; pass --convert-channels to convert them.")
    return load_dataset(train, target.resolution, target.image_channels), str(train)
