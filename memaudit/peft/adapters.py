"""Adapters on disk: what a PEFT method trained, saved beside everything needed to rebuild and describe it.

An adapter folder holds ``adapter.safetensors`` (every trainable tensor of the method: DiffFit's scales and
biases, SV-DIFF's spectral shifts, LoRA's factors, ...) and ``adapter.json`` (method, granularity, the mask and the
learning rate it was trained with, the unit names, steps, seed, base model, sizes and library versions). All
trainable tensors are saved even when a mask switched units off (those hold their initial values), so loading
rebuilds the trained denoiser (UNet or transformer, of any family) exactly. Files are written atomically; tensors are
read with safetensors only, never unpickled.

:func:`export_merged` turns base + adapter into a plain diffusers pipeline folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_directory
from memaudit.core.outputs import check_output, output_directory
from memaudit.core.provenance import versions
from memaudit.families import family_for_denoiser
from memaudit.peft.base import PEFTMethod
from memaudit.peft.registry import available_methods, get_method
from memaudit.target import load_target, resolve_dtype

__all__ = ["EXPORT_INFO_FILE", "KIND", "META_FILE", "SCHEMA_VERSION", "WEIGHTS_FILE", "export_merged", "load_adapter",
           "read_adapter_info", "save_adapter"]

logger = logging.getLogger(__name__)

KIND = "memaudit.adapter"
SCHEMA_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
EXPORT_INFO_FILE = "memaudit_adapter.json"
_RESERVED = ("kind", "schema_version", "method", "granularity", "mask", "units", "learning_rate", "steps", "seed",
             "base", "trainable_parameters", "trainable_percent", "versions")


def save_adapter(method: PEFTMethod, path: str | os.PathLike, *, base: str, mask: list[int] | None, learning_rate: float,
                 steps: int, seed: int, extra: dict | None = None) -> Path:
    """Write ``method``'s adapter to the folder ``path`` (replaced whole, atomically) and return the path.

    ``mask`` is the 0/1 mask the method was trained with (``None``: every unit), ``base`` the base model it
    applies to; both are recorded with the learning rate, steps and seed. ``extra`` adds keys to ``adapter.json``.
    """
    from safetensors.torch import save_file  # safetensors: only needed when an adapter is saved

    bits = method.check_mask(mask) if mask is not None else None
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED]
    if clash:
        raise ConfigError(f"extra adapter metadata may not override {clash[0]!r}; rename that key.")
    summary = method.summary()
    meta = {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "method": method.name,
        "granularity": method.granularity,
        "mask": bits,
        "units": [u["name"] for u in summary["units"]],
        "learning_rate": float(learning_rate),
        "steps": int(steps),
        "seed": int(seed),
        "base": str(base),
        "trainable_parameters": summary["trainable_parameters"],
        "trainable_percent": summary["trainable_percent"],
        "versions": {k: vers[k] for vers in [versions()] for k in ("torch", "diffusers", "memaudit")},
        **extra,
    }
    state = method.adapter_state()
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": method.name})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    logger.info("saved %s adapter (%d tensors) to %s", method.name, len(state), path)
    return path


def read_adapter_info(path: str | os.PathLike) -> dict:
    """The validated ``adapter.json`` of an adapter folder."""
    folder = Path(path)
    meta_file = folder / META_FILE
    if not folder.exists():
        raise ConfigError(f"adapter folder {folder} does not exist; pass the adapter/ folder inside the --out of "
                          "memaudit finetune --method M (any method but full) or memaudit mitigate finetune.")
    if not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not an adapter folder; pass the folder that holds {META_FILE} and "
                          f"{WEIGHTS_FILE}" + (f" ({folder.parent})." if folder.name == META_FILE else "."))
    if not meta_file.is_file():
        inside = folder / "adapter" / META_FILE
        hint = f" ({folder / 'adapter'} is one)" if inside.is_file() else ""
        raise ConfigError(f"{folder} has no {META_FILE}, so it is not an adapter folder; pass the adapter/ folder{hint} "
                          "that memaudit finetune --method M (any method but full) or memaudit mitigate finetune "
                          "writes inside its --out.")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta_file} is not valid JSON ({e}); save the adapter again.") from e
    if not isinstance(meta, dict) or meta.get("kind") != KIND:
        raise ConfigError(f"{meta_file} is not a memaudit adapter description (kind must be {KIND!r}).")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"{meta_file} has schema version {meta.get('schema_version')!r}; this memaudit reads "
                          f"version {SCHEMA_VERSION}: upgrade memaudit or save the adapter again.")
    for key, kind in (("method", str), ("granularity", str), ("units", list)):
        if not isinstance(meta.get(key), kind):
            raise ConfigError(f"{meta_file} lacks a valid {key!r}; save the adapter again.")
    if meta["method"] not in available_methods():
        raise ConfigError(f"{meta_file} names the unknown PEFT method {meta['method']!r}; available: "
                          f"{', '.join(available_methods())}.")
    if not (folder / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{folder} has no {WEIGHTS_FILE}; the adapter folder is incomplete, save it again.")
    return meta


def load_adapter(path: str | os.PathLike, denoiser) -> PEFTMethod:
    """Build the saved method on ``denoiser`` (in place, with the saved granularity), load its tensors and return it.

    The units must be those the adapter was saved with; otherwise, or when the tensors do not fit, the denoiser is put
    back as it was and a ConfigError says so.
    """
    from safetensors import SafetensorError  # safetensors: only needed when an adapter is loaded
    from safetensors.torch import load_file

    meta = read_adapter_info(path)
    folder = Path(path)
    try:
        state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{folder / WEIGHTS_FILE} could not be read ({e}); save the adapter again.") from e
    method = get_method(meta["method"], denoiser, meta["granularity"])
    try:
        units = [u.name for u in method.units()]
        if units != meta["units"]:
            first = next((i for i, (a, b) in enumerate(zip(units, meta["units"])) if a != b), min(len(units),
                                                                                                  len(meta["units"])))
            saved = meta["units"][first] if first < len(meta["units"]) else "(none)"
            here = units[first] if first < len(units) else "(none)"
            kind = "UNet" if family_for_denoiser(denoiser).denoiser_name == "unet" else type(denoiser).__name__
            raise ConfigError(f"adapter {folder} does not fit this {kind}: unit {first} is {saved} in the adapter but "
                              f"{here} here ({len(meta['units'])} vs {len(units)} units); load it onto its base "
                              f"model ({meta.get('base', 'unknown')}).")
        method.load_adapter_state(state)
    except ConfigError:
        method.unload()  # nothing was loaded yet: taking the freshly installed method out restores the denoiser
        raise
    logger.info("loaded %s adapter from %s", meta["method"], folder)
    return method


def export_merged(adapter_path: str | os.PathLike, base_pipeline_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str | torch.dtype | None = None) -> Path:
    """Base pipeline + adapter, merged, written as a plain diffusers pipeline folder (atomically).

    The base's own pipeline class (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtSigmaPipeline``, ...) loads it with ``from_pretrained``
    without memaudit. The denoiser and VAE are cast to ``dtype`` when given; ``memaudit_adapter.json`` beside the
    components records the adapter and base.
    """
    out = check_output(out_dir, "export", [("the adapter", adapter_path), ("the base model", base_pipeline_dir)])
    meta = read_adapter_info(adapter_path)
    target = load_target(base_pipeline_dir, device="cpu")
    method = load_adapter(adapter_path, target.denoiser)
    method.merge()
    with output_directory(out, "export") as tmp:
        target.save(tmp, dtype=resolve_dtype(dtype) if dtype is not None else None)
        info = {**meta, "adapter": str(Path(adapter_path).resolve()), "merged_into": str(base_pipeline_dir)}
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    logger.info("exported %s merged with %s to %s", base_pipeline_dir, adapter_path, out)
    return out
