"""Stage 2 of MemControl: fine-tune on the full training data with the mask the search chose, then audit.

``mask.json`` (written by :func:`memaudit.mitigate.search.run_mask_search`) names the method, the unit granularity,
the mask and the learning rate; :func:`finetune_with_mask` trains with exactly those on any dataset of the same
kind. Applying a mask found on one dataset to another is the paper's *transfer* experiment: the units are those of
the UNet, not of the data, so a mask transfers between datasets fine-tuned from the same base architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from memaudit.errors import ConfigError

MASK_KIND = "memaudit.mask"


def read_mask(path: str | os.PathLike) -> dict:
    """A search's ``mask.json`` (or its folder), checked: method, granularity, mask and learning rate."""
    path = Path(path)
    if path.is_dir():
        path = path / "mask.json"
    if not path.is_file():
        raise ConfigError(f"mask file {path} does not exist; pass the mask.json written by memaudit mitigate search.")
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"mask file {path} is not valid JSON ({e}).") from e
    if not isinstance(doc, dict) or doc.get("kind") != MASK_KIND:
        raise ConfigError(f"mask file {path} is not a memaudit mask (kind {MASK_KIND!r}).")
    for key in ("method", "granularity", "mask", "learning_rate"):
        if key not in doc:
            raise ConfigError(f"mask file {path} lacks {key!r}; rerun memaudit mitigate search to write it.")
    if not isinstance(doc["mask"], list) or any(b not in (0, 1) for b in doc["mask"]):
        raise ConfigError(f"mask file {path}: 'mask' must be a list of 0/1 values.")
    return doc


def finetune_with_mask(base, train, mask_file, out, *, steps: int, batch_size: int = 32, seed: int | None = None,
                       mitigation: str = "none", device: str = "auto", convert_channels: bool = False,
                       overwrite: bool = False, progress=None, cache_dir: str | os.PathLike | None = None,
                       cache_progress=None, loras: list | tuple = ()) -> dict:
    """Fine-tune ``base`` on ``train`` with the method, mask and learning rate of ``mask_file``; returns the
    fine-tune's settings (as :func:`memaudit.finetune.finetune`, whose ``cache_dir`` and ``cache_progress`` these
    are: the latent cache the search filled is found here when the images are the same)."""
    from memaudit.finetune import FinetuneConfig, finetune

    doc = read_mask(mask_file)
    cfg = FinetuneConfig(method=doc["method"], granularity=doc["granularity"], mask=doc["mask"],
                         learning_rate=float(doc["learning_rate"]), steps=steps, batch_size=batch_size,
                         seed=int(doc.get("seed", 0) if seed is None else seed), mitigation=mitigation,
                         loras=[list(x) for x in loras])
    # a mask of the wrong length for this base model's units stops before training, with one line
    return finetune(base, train, out, cfg, device=device, convert_channels=convert_channels, overwrite=overwrite,
                    progress=progress, cache_dir=cache_dir, cache_progress=cache_progress,
                    reads=[("--mask", mask_file)])
