"""memaudit: audit fine-tuned diffusion models for memorized training images, and mitigate it."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_target",
    "load_dataset",
    "Target",
    "ImageCaptionDataset",
    "MemauditError",
]


def __getattr__(name: str):
    # Heavy modules (torch, diffusers) load only when their names are used, so `memaudit --version` is fast.
    if name in ("load_target", "Target"):
        from memaudit import target

        return getattr(target, name)
    if name in ("load_dataset", "ImageCaptionDataset"):
        from memaudit import data

        return getattr(data, name)
    if name == "MemauditError":
        from memaudit.core.errors import MemauditError

        return MemauditError
    raise AttributeError(f"module 'memaudit' has no attribute {name!r}")
