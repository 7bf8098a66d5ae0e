"""Image-caption datasets: indexes of image files (or in-memory arrays), read in batches.

A dataset on disk is an *index*: file paths, captions and names. Each image is known by its content (the SHA-256 of
its file, :mod:`memaudit.core.digests`), so an edited image is another image whatever its modification time, and a
copied or moved dataset keeps its keys. Pixels are decoded on demand, in batches, by a
:class:`torch.utils.data.DataLoader` whose worker processes decode while the caller computes
(:meth:`ImageCaptionDataset.batches`), so memory does not grow with the number of images. Images of any size are
brought to the model's resolution by the rule of diffusers' training scripts: the shorter side is resized to the
resolution (bicubic) and the centre is cropped. Pixels are float32 in ``[-1, 1]`` (the range Stable Diffusion's VAE
expects). :func:`from_arrays` builds an in-memory dataset (tests, the demo); it behaves the same.

The package's modules:

- :mod:`memaudit.data.dataset`: :class:`ImageCaptionDataset` (reading, splits, subsets, content keys, overlap) and
  :func:`from_arrays`;
- :mod:`memaudit.data.readers`: :func:`load_dataset` and the captions-file and image-folder readers (the on-disk
  layouts are described there);
- :mod:`memaudit.data.decode`: every PIL image mode decoded to 8 bits (:func:`to_8bit`), :data:`DECODE_VERSION`;
- :mod:`memaudit.data.compat`: a dataset against a target (:func:`dataset_for_target`, :func:`mismatch`,
  :func:`native_channels`).
"""

from memaudit.data.compat import dataset_for_target, mismatch, native_channels
from memaudit.data.dataset import ImageCaptionDataset, default_workers, from_arrays, large_buffers_from_mmap
from memaudit.data.decode import DECODE_VERSION, to_8bit
from memaudit.data.readers import IMAGE_EXTENSIONS, load_dataset

__all__ = ["DECODE_VERSION", "IMAGE_EXTENSIONS", "ImageCaptionDataset", "dataset_for_target", "default_workers",
           "from_arrays", "large_buffers_from_mmap", "load_dataset", "mismatch", "native_channels", "to_8bit"]
