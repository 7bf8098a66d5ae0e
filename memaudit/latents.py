"""The latent cache: every training image's VAE posterior, encoded once and kept on disk.

Training a latent diffusion model needs, at every step, a latent drawn from the VAE posterior of each image of the
batch. Encoding a whole training set in memory does not scale, and encoding it again for every fine-tune, search
evaluation or baseline on the same data wastes the VAE's time. :func:`latents_for` gives the posteriors of a
dataset's images from a cache on disk, encoding only the images it does not hold yet.

An *entry* is one image's posterior: its mean and standard deviation, already multiplied by the VAE's scaling
factor (exactly what :meth:`memaudit.target.Target.encode_images` returns), float32, ``[2, c, h, w]``. Its key is
the image's key (:meth:`memaudit.data.ImageCaptionDataset.image_keys`: the SHA-256 of the file's bytes, or a hash of
in-memory pixels; the resolution, channels and decoding are part of it). Entries live in one folder per VAE and
device::

    CACHE_DIR/latents/<vae>-<resolution>px-<device>/
        chunk-<utc time>-<id>.npy     float32 [n, 2, c, h, w]: mean and std of n entries (numpy format)
        chunk-<utc time>-<id>.json    the n keys and the SHA-256 of each row's bytes, in row order, the shape, and
                                      a seal of the JSON itself (:func:`memaudit.core.digests.with_seal`)

**Verified when read.** A row is checked against its SHA-256 the first time a process reads it (the bytes are
hashed as they arrive, no second read: 0.17 ms per 128 KiB Stable Diffusion entry, 0.10 s per 64 MB chunk, measured
on a busy two-core machine). A row that does not match, or a chunk whose header no longer reads, is reported (a
warning naming the file), marked dropped in its JSON (its key becomes ``null``, so no process uses it again) and
encoded again at once, alone: the rest of the chunk and of the cache is kept. A JSON whose seal does not match, or
whose array does not fit it, is ignored (with a warning) and its images are encoded again.

``<vae>`` is a hash of the VAE's configuration and every tensor of its state dict (names, dtypes, shapes, bytes).
``<device>`` keeps encodings made on CUDA apart from those made on the CPU: the two differ in the last bits, and a
run's result should not depend on which machine encoded its data first. Every build appends new chunks and never
changes an old one, so a subset of a set (a search's proxy split) finds the set's entries, and a changed image, VAE
or resolution costs only the entries it changes (old ones stay until the folder is deleted; the cache only holds
what can be rebuilt). A chunk is written to a temporary name, synced, renamed, and only then listed by its JSON, so a
crash or an unreadable image mid-build leaves no entry half-written: chunks without their JSON are ignored (and the
temporary file is removed when the build fails in this process). Builds fill chunks of at most ``chunk_bytes``
(a multiple of the batch size of images), so a build interrupted after some chunks keeps them, and its rerun encodes
the remaining images in the very batches an uninterrupted build would have used.

Encoding runs over :meth:`~memaudit.data.ImageCaptionDataset.batches` (worker processes decode while the VAE
encodes) in batches of ``batch_size`` in dataset order. The VAE's result for an image depends in the last bits on
the batch it was encoded in, so an entry found in the cache may differ by a rounding error from encoding the same
image in another batch; the first encoding is kept. Training reads a batch's entries with positional reads of the
chunk files (:meth:`DatasetLatents.sample`), not through memory maps, whose touched pages would count in the
process's memory: the set is never in memory at once, and a long run's memory does not grow with the cache. (A build
writes its chunk through a memory map: up to ``chunk_bytes`` of dirty pages while it is filled.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from memaudit.core.digests import seal_ok, with_seal
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_json, check_writable, default_cache_dir
from memaudit.data import mismatch

logger = logging.getLogger(__name__)

__all__ = ["CHUNK_BYTES", "DatasetLatents", "LatentStore", "encode_batch_size", "latent_cache_root", "latents_for",
           "vae_hash"]

KIND = "memaudit.latents"
SCHEMA_VERSION = 2  # 2: content keys, a SHA-256 per row and a sealed JSON
SUBDIR = "latents"
#: the largest chunk a build writes, in bytes (512 Stable Diffusion images at 512 px: a build killed mid-chunk loses
#: at most this much encoding, minutes on a CPU; 110,000 images make about 215 chunk files)
CHUNK_BYTES = 64 << 20

#: progress(done, total) in images encoded
CacheProgress = Callable[[int, int], None]
# rows of chunk files this process has read and found to match their SHA-256 (chunk path -> one flag per row)
_VERIFIED: dict[str, np.ndarray] = {}
# rows found damaged in this process (chunk path, row): never used again, even if their JSON cannot be rewritten
_DAMAGED: set[tuple[str, int]] = set()
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_of(x: torch.Tensor) -> str:
    """``channels_last`` when the 4-d tensor ``x`` is laid out so (and not also plainly contiguous), else
    ``contiguous``."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def latent_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the latent cache lives: ``CACHE_DIR/latents`` (default :func:`memaudit.core.io.default_cache_dir`)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / SUBDIR


def vae_hash(target) -> str:
    """A hash of ``target``'s VAE: its configuration, its scaling factor and every tensor of its state dict."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(target.vae.config).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"|scaling={float(target.scaling_factor)!r}".encode())
    for name, tensor in sorted(target.vae.state_dict().items()):
        t = tensor.detach()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class LatentStore:
    """The cache folder of one VAE (and resolution and device): its chunks and the index key -> (chunk, row)."""

    def __init__(self, cache_dir: str | os.PathLike | None, target):
        self.target = target
        self.vae = vae_hash(target)
        self.resolution = int(target.resolution)
        self.device = target.device.type
        self.root = latent_cache_root(cache_dir)
        self.folder = self.root / f"{self.vae[:16]}-{self.resolution}px-{self.device}"
        self.chunks: list[Path] = []  # .npy paths, oldest first
        self.row_sha256: list[list[str]] = []  # per chunk, the SHA-256 of each row's bytes
        self.shape: tuple[int, ...] | None = None  # (2, c, h, w) of an entry
        self.memory_format = "contiguous"  # the VAE's output layout, which latents are handed out in
        self.index: dict[str, tuple[int, int]] = {}
        self.refresh()

    def __len__(self) -> int:
        return len(self.index)

    def refresh(self) -> None:
        """Read the chunk lists again (another process may have added chunks)."""
        self.chunks, self.row_sha256, self.index, self.shape, self.memory_format = [], [], {}, None, "contiguous"
        if not self.folder.is_dir():
            return
        for doc_path in sorted(self.folder.glob("chunk-*.json")):
            read = self._read_chunk(doc_path)
            if read is None:
                continue
            keys, digests = read
            c = len(self.chunks)
            npy = doc_path.with_suffix(".npy")
            self.chunks.append(npy)
            self.row_sha256.append(digests)
            for row, key in enumerate(keys):
                if key is not None and (str(npy), row) not in _DAMAGED:
                    self.index.setdefault(key, (c, row))

    def _read_chunk(self, doc_path: Path) -> tuple[list[str | None], list[str]] | None:
        """The keys (``None`` for a dropped row) and row digests of a chunk whose JSON is intact and agrees with its
        array (shape, dtype, size on disk); None for an unusable one."""
        npy = doc_path.with_suffix(".npy")
        try:
            doc = json.loads(doc_path.read_text())
            if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("schema_version") != SCHEMA_VERSION:
                logger.info("latent cache: ignoring chunk %s (not a memaudit latent chunk of schema %d)",
                            doc_path.name, SCHEMA_VERSION)
                return None
            if not seal_ok(doc):
                raise ValueError("its JSON is damaged: the seal does not match")
            keys, shape = list(doc["keys"]), tuple(int(s) for s in doc["shape"])
            digests = [str(d) for d in doc["row_sha256"]]
            if len(digests) != len(keys) or not all(k is None or isinstance(k, str) for k in keys):
                raise ValueError("its key and checksum lists do not match")
            with open(npy, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                array_shape, fortran, dtype = read_header(f)
                data_start = f.tell()
            size = npy.stat().st_size
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("latent cache: ignoring chunk %s (%s); its images are encoded again", doc_path, e)
            return None
        expected = (len(keys), *shape)
        if (tuple(array_shape) != expected or fortran or dtype != np.float32
                or size != data_start + 4 * math.prod(expected)):
            logger.warning("latent cache: ignoring chunk %s (its array does not match its key list); its images are "
                           "encoded again", doc_path)
            return None
        if self.shape is not None and shape != self.shape:
            logger.warning("latent cache: ignoring chunk %s (entries of shape %s, not %s)", doc_path.name, shape,
                           self.shape)
            return None
        self.shape = shape
        if doc.get("memory_format") in MEMORY_FORMATS:
            self.memory_format = doc["memory_format"]
        return keys, digests

    def drop_rows(self, npy: Path, rows: Sequence[int]) -> None:
        """Mark ``rows`` of chunk ``npy`` damaged: never used again by this process, and their keys set to ``null``
        in the chunk's JSON for every later one (if the JSON can be rewritten)."""
        for r in rows:
            _DAMAGED.add((str(npy), int(r)))
        doc_path = npy.with_suffix(".json")
        try:
            doc = json.loads(doc_path.read_text())
            if not seal_ok(doc):
                raise ValueError("its seal does not match")
            keys = list(doc["keys"])
            for r in rows:
                if 0 <= r < len(keys):
                    keys[r] = None
            if all(k is None for k in keys):  # nothing left in it: the chunk goes (its JSON first)
                doc_path.unlink(missing_ok=True)
                npy.unlink(missing_ok=True)
                return
            atomic_write_json(doc_path, with_seal({**doc, "keys": keys}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("latent cache: cannot mark the damaged rows of %s (%s); removing the chunk", doc_path, e)
            doc_path.unlink(missing_ok=True)

    def build(self, dataset, indices: Sequence[int], *, batch_size: int = 64, workers: int | None = None,
              progress: CacheProgress | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
        """Encode the images of ``dataset`` at ``indices`` (in that order, ``batch_size`` at a time) and append
        them to the cache as chunks; returns the number of chunks written."""
        indices = list(indices)
        if not indices:
            return 0
        check_writable(self.folder, "--cache-dir")
        keys = dataset.image_keys()
        c, h, w = self.target.latent_shape
        entry_bytes = 2 * c * h * w * 4
        rows_per_chunk = max(1, chunk_bytes // entry_bytes // batch_size) * batch_size
        pin = self.target.device.type == "cuda"
        writer: _ChunkWriter | None = None
        written, start = 0, 0
        try:
            for index, images in dataset.batches(batch_size, indices, workers=workers, pin_memory=pin,
                                                 progress=progress):
                mean, std = self.target.encode_images(images, batch_size)
                self.memory_format = memory_format_of(mean)
                entries = torch.stack([mean.cpu(), std.cpu()], dim=1).numpy()
                pos = 0
                while pos < len(entries):
                    if writer is None:
                        rows = min(rows_per_chunk, len(indices) - start)
                        writer = _ChunkWriter(self.folder, rows, entries.shape[1:], self, self.memory_format)
                    take = min(writer.free, len(entries) - pos)
                    writer.put(entries[pos : pos + take], [keys[i] for i in index[pos : pos + take].tolist()])
                    pos += take
                    if writer.free == 0:
                        writer.commit()
                        written, start, writer = written + 1, start + writer.rows, None
        finally:
            if writer is not None:
                writer.abort()
        self.refresh()
        return written


class _ChunkWriter:
    """One chunk being written: a memory-mapped array at a temporary name, renamed and listed when full."""

    def __init__(self, folder: Path, rows: int, entry_shape: tuple[int, ...], store: LatentStore,
                 memory_format: str):
        if store.shape is not None and tuple(entry_shape) != store.shape:
            raise ConfigError(f"the VAE gives latents of shape {tuple(entry_shape)} but the latent cache {folder} "
                              f"holds {store.shape}; delete that folder to rebuild it.")
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.name = f"chunk-{stamp}-{uuid.uuid4().hex[:8]}"
        self.folder, self.rows, self.entry_shape, self.filled = folder, rows, tuple(entry_shape), 0
        self.memory_format = memory_format
        self.tmp = folder / f".{self.name}.npy.tmp"
        self.npy, self.doc = folder / f"{self.name}.npy", folder / f"{self.name}.json"
        self.keys: list[str] = []
        self.row_sha256: list[str] = []
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(rows, *entry_shape))

    @property
    def free(self) -> int:
        return self.rows - self.filled

    def put(self, entries: np.ndarray, keys: list[str]) -> None:
        self.array[self.filled : self.filled + len(entries)] = entries
        # the digest of each row as stored (C order float32: the bytes a read gets)
        self.row_sha256.extend(hashlib.sha256(self.array[r]).hexdigest()
                               for r in range(self.filled, self.filled + len(entries)))
        self.keys.extend(keys)
        self.filled += len(entries)

    def commit(self) -> None:
        self.array.flush()
        del self.array
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.npy)
        try:
            atomic_write_json(self.doc, with_seal({
                "kind": KIND, "schema_version": SCHEMA_VERSION, "shape": list(self.entry_shape),
                "memory_format": self.memory_format,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "keys": self.keys, "row_sha256": self.row_sha256}))
        except BaseException:
            self.npy.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        self.tmp.unlink(missing_ok=True)


class _DamagedChunk(Exception):
    """A chunk file whose header no longer reads as the array its JSON describes."""


class DatasetLatents:
    """The cached posteriors of one dataset's images, in dataset order, read from the cache's chunk files.

    Every row is checked against its SHA-256 the first time this process reads it (see the module's docstring); a
    damaged entry is encoded again from ``dataset`` (``batch_size`` images at a time, ``workers`` decoding) and the
    read goes on with the new entry. Without ``dataset``, a damaged entry is a :class:`~memaudit.core.errors.ConfigError`
    naming its file.
    """

    def __init__(self, store: LatentStore, keys: Sequence[str], report: dict, dataset=None, *,
                 batch_size: int | None = None, workers: int | None = None):
        self.store, self.keys = store, list(keys)
        self.dataset, self.workers = dataset, workers
        self.batch_size = batch_size or encode_batch_size(store.resolution)
        self.shape = store.shape or (2, *store.target.latent_shape)
        self.folder = store.folder
        self.memory_format = MEMORY_FORMATS[store.memory_format]
        self.report = report
        self._files: dict[Path, tuple[int, int, int]] = {}
        self._locate()

    def _locate(self) -> None:
        """Where each key's entry is, from the store's index."""
        missing = [k for k in self.keys if k not in self.store.index]
        if missing:
            raise ConfigError(f"the latent cache {self.store.folder} lacks {len(missing)} of the images; build it with "
                              "latents_for().")
        where = [self.store.index[k] for k in self.keys]
        self.chunk_of = np.array([c for c, _ in where], dtype=np.int64)
        self.row_of = np.array([r for _, r in where], dtype=np.int64)
        self.chunks = list(self.store.chunks)
        self.row_sha256 = list(self.store.row_sha256)

    def __len__(self) -> int:
        return len(self.chunk_of)

    def _file(self, c: int) -> tuple[int, int, int]:
        """Chunk ``c`` opened for positional reads: file descriptor, offset of its first row, bytes per row."""
        npy = self.chunks[c]
        if npy not in self._files:
            try:
                fd = os.open(npy, os.O_RDONLY)
            except OSError as e:
                raise _DamagedChunk(f"cannot open it: {e.strerror or e}") from e
            try:
                with open(fd, "rb", closefd=False) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                    offset = f.tell()
            except (OSError, ValueError, SyntaxError, TypeError) as e:
                os.close(fd)
                raise _DamagedChunk(f"its header does not read: {e}") from e
            if (fortran or dtype != np.dtype(np.float32) or tuple(shape[1:]) != tuple(self.shape)
                    or shape[0] != len(self.row_sha256[c])):
                os.close(fd)
                raise _DamagedChunk(f"its header says {shape} {dtype}, not {len(self.row_sha256[c])} float32 rows "
                                    f"of {self.shape}")
            self._files[npy] = (fd, offset, int(np.prod(shape[1:])) * 4)
        return self._files[npy]

    def _read_into(self, flat: np.ndarray, idx: np.ndarray) -> dict[Path, set[int]]:
        """Read the rows of ``idx`` into ``flat``, checking each row the first time this process reads it; returns
        the damaged rows found, by chunk (their places in ``flat`` are left unfilled)."""
        bad: dict[Path, set[int]] = {}
        for k, (c, r) in enumerate(zip(self.chunk_of[idx].tolist(), self.row_of[idx].tolist())):
            npy = self.chunks[c]
            try:
                fd, offset, row_bytes = self._file(c)
            except _DamagedChunk as e:
                if npy not in bad:
                    logger.warning("latent cache chunk %s is damaged (%s); encoding its images again", npy, e)
                bad.setdefault(npy, set()).update(range(len(self.row_sha256[c])))
                continue
            data = os.pread(fd, row_bytes, offset + r * row_bytes)
            verified = _VERIFIED.setdefault(str(npy), np.zeros(len(self.row_sha256[c]), dtype=bool))
            if not verified[r]:
                if len(data) != row_bytes or hashlib.sha256(data).hexdigest() != self.row_sha256[c][r]:
                    bad.setdefault(npy, set()).add(r)
                    continue
                verified[r] = True
            flat[k] = np.frombuffer(data, dtype=np.float32)
        return bad

    def _repair(self, bad: dict[Path, set[int]]) -> None:
        """Drop the damaged rows and encode their images again (only theirs)."""
        for npy, rows in bad.items():
            if self.dataset is None:
                raise ConfigError(f"latent cache chunk {npy} is damaged ({len(rows)} entries fail their checksum); "
                                  f"delete it to have its images encoded again.")
            logger.warning("latent cache chunk %s: %d entr%s do not match their checksum (damaged); encoding those "
                           "images again", npy, len(rows), "y" if len(rows) == 1 else "ies")
            self.store.drop_rows(npy, sorted(rows))
        self.store.refresh()
        todo, queued = [], set()
        for i, key in enumerate(self.keys):
            if key not in self.store.index and key not in queued:
                todo.append(i)
                queued.add(key)
        if todo:
            self.store.build(self.dataset, todo, batch_size=self.batch_size, workers=self.workers)
        self.report["repaired"] = self.report.get("repaired", 0) + len(todo)
        self._locate()

    def entries(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Mean and std of the images at ``indices``: float32 ``[k, 2, c, h, w]``, read from disk now.

        Rows are read with ``os.pread``, not through a memory map: a mapped file's pages count in the process's
        resident memory once touched (with the kernel's fault-around, more than the rows read), so a long run over a
        large cache grew with the cache; read pages stay in the page cache, which the kernel reclaims. Each row is
        checked against its SHA-256 the first time this process reads it; a damaged one is encoded again."""
        idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        flat = out.reshape(len(idx), -1)
        bad = self._read_into(flat, idx)
        if bad:
            self._repair(bad)
            still = self._read_into(flat, idx)
            if still:
                npy = next(iter(still))
                raise ConfigError(f"latent cache chunk {npy} is damaged again right after it was written; check the "
                                  f"disk holding {self.folder}.")
        return torch.from_numpy(out)

    def mean_std(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std ``[k, c, h, w]`` of the images at ``indices``, in the memory layout the VAE gave them (the
        UNet's convolutions may round differently on another layout)."""
        e = self.entries(indices)
        return e[:, 0].contiguous(memory_format=self.memory_format), e[:, 1].contiguous(memory_format=self.memory_format)

    def means(self, indices=None, batch_size: int = 1024) -> torch.Tensor:
        """The posterior means ``[k, c, h, w]`` of ``indices`` (default: every image), read a batch at a time."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        parts = [self.entries(idx[k : k + batch_size])[:, 0].contiguous(memory_format=self.memory_format)
                 for k in range(0, len(idx), batch_size)]
        return torch.cat(parts) if parts else torch.empty((0, *self.shape[1:]))

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Latents drawn from the posteriors of ``indices``: ``mean + std * noise``, the noise from ``generator``."""
        mean, std = self.mean_std(indices)
        noise = torch.randn(mean.shape, generator=generator)
        return mean + std * noise

    def close(self) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def encode_batch_size(resolution: int) -> int:
    """Images per VAE encoding batch: 64 up to 128 px, then as many as hold the pixels of four 512-px images (the VAE's
    activations grow with the pixels: Stable Diffusion's VAE needs about 0.7 GB more per 512-px image on the CPU)."""
    return max(1, min(64, 4 * 512 * 512 // (int(resolution) ** 2)))


def latents_for(target, dataset, cache_dir: str | os.PathLike | None = None, *, batch_size: int | None = None,
                workers: int | None = None, progress: CacheProgress | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> DatasetLatents:
    """The VAE posteriors of every image of ``dataset``, from the latent cache in ``cache_dir`` (default
    :func:`memaudit.core.io.default_cache_dir`), encoding (and caching) those it lacks, ``batch_size`` at a time (default
    :func:`encode_batch_size`); ``progress(done, total)`` counts the images encoded. The result's ``report`` says
    what was found and what was encoded now, and where."""
    batch_size = batch_size or encode_batch_size(target.resolution)
    problem = mismatch(dataset, target)
    if problem:
        raise ConfigError(problem)
    started = time.perf_counter()
    store = LatentStore(cache_dir, target)
    keys = dataset.image_keys()
    todo, queued = [], set()
    for i, key in enumerate(keys):
        if key not in store.index and key not in queued:
            todo.append(i)
            queued.add(key)
    found = sum(1 for k in keys if k in store.index)
    chunks = 0
    if todo:
        logger.info("latent cache %s: encoding %d of %d images", store.folder, len(todo), len(keys))
        chunks = store.build(dataset, todo, batch_size=batch_size, workers=workers, progress=progress,
                             chunk_bytes=chunk_bytes)
    status = "reused" if not todo else ("built" if found == 0 else "updated")
    report = {"status": status, "path": str(store.folder), "images": len(keys), "found": found,
              "encoded": len(todo), "chunks_written": chunks, "vae_sha256": store.vae,
              "resolution": store.resolution, "device": store.device,
              "wall_time_s": round(time.perf_counter() - started, 3)}
    logger.info("latent cache %s: %s (%d found, %d encoded)", store.folder, status, found, len(todo))
    return DatasetLatents(store, keys, report, dataset, batch_size=batch_size, workers=workers)
