"""Loading a target: a diffusers pipeline folder (or a hub id already in the local cache) of a supported family, or
an in-memory pipeline (:func:`from_pipeline`), refusing pickled weights and pipelines memaudit cannot audit."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from memaudit.core.devices import resolve_device, resolve_dtype
from memaudit.core.errors import TargetError
from memaudit.families import Family, family_for_class, family_of, supported_text
from memaudit.families.blackbox import BlackBox, black_box_refusal
from memaudit.target.lora import apply_lora
from memaudit.target.target import Target

# the logger keeps the name it had before the target package, so users' logs read the same
logger = logging.getLogger("memaudit.target")

__all__ = ["from_pipeline", "index_components", "load_target"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def from_pipeline(pipe, device: str | torch.device = "auto", dtype: str | torch.dtype = "float32", path: str = "") -> Target:
    """Wrap an in-memory diffusers pipeline of a known family as a Target (its modules frozen, in eval mode)."""
    family = family_of(pipe)
    where = path or "the pipeline"
    if family is None:
        why = black_box_refusal(type(pipe).__name__, type(pipe))
        if why:
            raise TargetError(f"{where}: {why}; {supported_text()}.")
        family = BlackBox()
    missing = [c for c in family.components if getattr(pipe, c, None) is None]
    if missing:
        raise TargetError(f"{where} has no {', '.join(missing)}; {supported_text()}.")
    _check_classes(family, {c: type(getattr(pipe, c)).__name__ for c in family.components}, where)
    why = family.ready(pipe)
    if why:
        raise TargetError(f"{where}: {why}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    target = Target(pipe=pipe, family=family, path=path)
    target.to(device, dtype)
    for _, m in target.modules():
        m.eval()
        m.requires_grad_(False)
    return target


def _check_classes(family: Family, classes: dict[str, str], where: str) -> None:
    for comp, accepted in family.components.items():
        got = classes.get(comp)
        if got is not None and not any(str(got).startswith(a) for a in accepted):
            raise TargetError(f"{where}: {comp} is a {got}, not a {' or '.join(accepted)} as {family.title} needs; "
                              f"{supported_text()}.")


def _resolve_path(model: str | os.PathLike) -> Path:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TargetError(f"{model} is a file; pass the diffusers pipeline folder (the one with model_index.json).")
        return path
    text = str(model)
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception as e:  # huggingface_hub raises several types for "not cached"
            raise TargetError(
                f"{text} is not a local folder and not in the local Hugging Face cache; memaudit never downloads "
                f"(it runs offline): download it first (e.g. `hf download {text}`) or pass a local folder."
            ) from e
    raise TargetError(f"model folder {model} does not exist; pass a diffusers pipeline folder with model_index.json.")


_SAFE_PLAIN = re.compile(r"^[^.]+(-\d+-of-\d+)?\.safetensors$|^[^.]+\.safetensors\.index\.json$")
_SAFE_VARIANT = re.compile(r"^[^.]+\.([\w]+?)(-\d+-of-\d+)?\.safetensors$|^[^.]+\.safetensors\.index\.([\w]+)\.json$")


def _weights_variant(folder: Path, component: str) -> str | None:
    """None for plain safetensors, 'fp16' etc. for variant-only safetensors (sharded or not); errors for pickles."""
    files = [f.name for f in folder.iterdir() if f.is_file()]
    if any(_SAFE_PLAIN.match(f) for f in files):
        return None
    for f in files:
        m = _SAFE_VARIANT.match(f)
        if m:
            return m.group(1) or m.group(3)
    pickled = [f for f in files if f.endswith((".bin", ".ckpt", ".pt", ".pth", ".pkl"))]
    if pickled:
        raise TargetError(
            f"{folder} has only pickled weights ({pickled[0]}); memaudit never unpickles model files: convert "
            f"{component} to safetensors (save_pretrained(..., safe_serialization=True))."
        )
    raise TargetError(f"{folder} has no weights file; the {component} folder must hold safetensors weights.")


def _component_class(index: dict, component: str) -> tuple[str | None, str | None]:
    entry = index.get(component)
    if isinstance(entry, list) and len(entry) == 2:
        return entry[0], entry[1]
    return None, None


def load_target(
    model: str | os.PathLike,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    loras: list | tuple = (),
) -> Target:
    """Load a diffusers pipeline folder of a supported family (or a hub id already in the local cache), with LoRA
    adapters ``loras`` (``[(path, scale), ...]``) applied to it."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    path = _resolve_path(model)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise TargetError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder; {supported_text()}.")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{index_file} is not valid JSON ({e}); re-save the pipeline with diffusers.") from e
    cls = str(index.get("_class_name", ""))
    family = family_for_class(cls)
    if family is None:
        return _load_black_box(path, cls, dev, dt, loras)
    missing = [c for c in family.components if index.get(c) in (None, [None, None]) or not (path / c).is_dir()]
    if missing:
        raise TargetError(f"{path} lacks the {', '.join(missing)} component(s) a {cls} needs; {supported_text()}.")
    _check_classes(family, {c: _component_class(index, c)[1] for c in family.components}, str(path))

    import importlib

    import diffusers

    def _load(component: str):
        library, name = _component_class(index, component)
        module = importlib.import_module(library) if library else diffusers
        loader = getattr(module, str(name), None) or getattr(diffusers, str(name), None)
        if loader is None or not hasattr(loader, "from_pretrained"):
            raise TargetError(f"{path / component}: class {library}.{name} is not installed; {supported_text()}.")
        try:
            if isinstance(loader, type) and issubclass(loader, torch.nn.Module):
                variant = _weights_variant(path / component, component)
                return loader.from_pretrained(path, subfolder=component, dtype=dt, use_safetensors=True,
                                              variant=variant)
            return loader.from_pretrained(path, subfolder=component)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise TargetError(f"{path / component} could not be loaded ({str(e).splitlines()[0]}); "
                              f"{supported_text()}.") from e

    parts = {c: _load(c) for c in family.components}
    pipe = family.build_pipeline(getattr(diffusers, cls), parts, index=index)
    logger.info("loaded %s (%s, %s) on %s as %s", path, cls, family.prediction_type(pipe), dev, dt)
    target = from_pipeline(pipe, dev, dt, path=str(path))
    for lora_path, scale in loras:
        apply_lora(target, lora_path, scale)
    return target


def _load_black_box(path: Path, cls: str, device: torch.device, dtype: torch.dtype, loras) -> Target:
    """A text-to-image pipeline of no known family, loaded by diffusers itself and audited by its images."""
    import diffusers

    why = black_box_refusal(cls, getattr(diffusers, cls, None)) if cls else "its model_index.json names no class"
    if why:
        raise TargetError(f"{path} is a {cls or 'pipeline of unknown class'}, which memaudit cannot audit ({why}); "
                          f"{supported_text()}.")
    for component in index_components(path):
        _weights_variant(path / component, component)  # refuses pickled weights before diffusers reads them
    try:
        pipe = getattr(diffusers, cls).from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise TargetError(f"{path} could not be loaded by diffusers ({str(e).splitlines()[0]}).") from e
    logger.info("loaded %s (%s) as a black box: images only", path, cls)
    target = from_pipeline(pipe, device, dtype, path=str(path))
    for lora_path, scale in loras:
        apply_lora(target, lora_path, scale)
    return target


def index_components(path: Path) -> list[str]:
    """The components of a pipeline folder that hold torch weights (subfolders with a config.json and weights)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()
                  and any(f.suffix in (".safetensors", ".bin", ".ckpt", ".pt", ".pth") or f.name.endswith(".json")
                          and "index" in f.name for f in p.iterdir()))
