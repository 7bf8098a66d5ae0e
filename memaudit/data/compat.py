"""A dataset against a target: its channels and resolution checked, or a folder loaded at the model's."""

from __future__ import annotations

import os

from PIL import Image

from memaudit.core.errors import DataError
from memaudit.data.dataset import ImageCaptionDataset
from memaudit.data.decode import strict_image_loading
from memaudit.data.readers import load_dataset, resolve_files

__all__ = ["dataset_for_target", "mismatch", "native_channels"]

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def native_channels(path: str | os.PathLike[str], *, captions_file: str | None = None, sample: int = 16) -> int:
    """1 if the dataset's images are grayscale, 3 if they are colour, judged from (up to) ``sample`` files.

    Lets a caller notice a training set whose channels differ from the model's before silently converting it.
    """
    paths, _, _, _ = resolve_files(path, captions_file)
    modes = set()
    with strict_image_loading():
        for p in paths[:sample]:
            try:
                with Image.open(p) as im:
                    modes.add(im.mode)
            except Exception as e:
                raise DataError(f"Image {p} is unreadable ({type(e).__name__}: {e}); replace or remove it.") from e
    return 1 if modes and modes <= _GRAY_MODES else 3


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
