"""Stage 2 of MemControl: fine-tune on the full training data with the mask the search chose, then audit.

``mask.json`` (written by :func:`memaudit.mitigate.search.run_mask_search`) names the method, the unit granularity,
the mask, the learning rate, and the units the mask was made for (names and parameter counts, and the model: family
and denoiser class); :func:`finetune_with_mask` trains with exactly those on any dataset of the same kind, and refuses
a base model whose units differ. Applying a mask found on one dataset to another is the paper's *transfer*
experiment: the units are those of the denoiser, not of the data, so a mask transfers between datasets fine-tuned from
the same base architecture.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from memaudit.core.errors import ConfigError
from memaudit.finetune import FinetuneConfig, finetune

logger = logging.getLogger(__name__)

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
    if "units" in doc or "unit_parameters" in doc:
        names, counts = doc.get("units"), doc.get("unit_parameters")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(counts, list)
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
                and len(names) == len(counts) == len(doc["mask"])):
            raise ConfigError(f"mask file {path}: 'units' and 'unit_parameters' must be lists of unit names and "
                              "parameter counts, one per bit of the mask; rerun memaudit mitigate search to write it.")
    return doc


def mask_units(doc: dict) -> dict | None:
    """What a mask was made for, for :meth:`memaudit.peft.base.PEFTMethod.check_units`: its units
    ``[[name, parameters], ...]`` in mask order and the model it was searched on (``base``, ``family``,
    ``denoiser``); None for a mask file that records no units (not written by memaudit mitigate search)."""
    if "units" not in doc:
        return None
    return {"units": [[n, c] for n, c in zip(doc["units"], doc["unit_parameters"])],
            **{k: doc[k] for k in ("base", "family", "denoiser") if doc.get(k)}}


def finetune_with_mask(base, train, mask_file, out, *, steps: int, batch_size: int = 32, seed: int | None = None,
                       mitigation: str = "none", device: str = "auto", convert_channels: bool = False,
                       overwrite: bool = False, progress=None, cache_dir: str | os.PathLike | None = None,
                       cache_progress=None, loras: list | tuple = ()) -> dict:
    """Fine-tune ``base`` on ``train`` with the method, mask and learning rate of ``mask_file``; returns the
    fine-tune's settings (as :func:`memaudit.finetune.finetune`, whose ``cache_dir`` and ``cache_progress`` these
    are: the latent cache the search filled is found here when the images are the same)."""
    doc = read_mask(mask_file)
    made_for = mask_units(doc)
    if made_for is None:
        # every mask.json the search writes records its units (and has since the first one); a file without them was
        # written by hand, for the order `memaudit mitigate units` lists, which the bits follow
        logger.warning("mask file %s records no units (it was not written by memaudit mitigate search): it cannot be "
                       "checked against %s and is applied bit by bit in unit order", mask_file, base)
    cfg = FinetuneConfig(method=doc["method"], granularity=doc["granularity"], mask=doc["mask"],
                         mask_units=made_for, learning_rate=float(doc["learning_rate"]), steps=steps,
                         batch_size=batch_size, seed=int(doc.get("seed", 0) if seed is None else seed),
                         mitigation=mitigation, loras=[list(x) for x in loras])
    # a mask made for other units than this base model's (another architecture, width or method) stops before
    # training, with one line naming the first unit that differs
    return finetune(base, train, out, cfg, device=device, convert_channels=convert_channels, overwrite=overwrite,
                    progress=progress, cache_dir=cache_dir, cache_progress=cache_progress,
                    reads=[("--mask", mask_file)])
