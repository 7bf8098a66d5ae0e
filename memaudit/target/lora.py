"""LoRA adapters applied to a target (:func:`apply_lora`): loading them (diffusers' loader, or a peft adapter folder
for families without one), the checks that refuse an adapter in one line (no match, no change, another
architecture: its first mismatching key and the two shapes), the scale, and the digests results.json records."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch

from memaudit.core.digests import sha256_file
from memaudit.core.errors import TargetError
from memaudit.target.target import Target

# the logger keeps the name it had before the target package, so users' logs read the same
logger = logging.getLogger("memaudit.target")

__all__ = ["apply_lora", "file_sha256", "lora_module_name", "lora_scale"]


#: the parts of a LoRA tensor's key that name its role, not its module (``x.lora_A.weight``, kohya's
#: ``x.lora_down.weight`` and ``x.alpha``, DoRA's magnitude, LoKr and LoHa factors, full ``diff`` tensors)
_LORA_PARTS = frozenset({
    "lora_A", "lora_B", "lora_down", "lora_up", "lora_mid", "lora", "lora_embedding_A", "lora_embedding_B",
    "lora_magnitude_vector", "dora_scale", "alpha", "diff", "diff_b", "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b",
    "lokr_w2_a", "lokr_w2_b", "lokr_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
})
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")
_STATE_DICT_OF = re.compile(r"Error\(s\) in loading state_dict for (\w+)")


def lora_module_name(key: str) -> str:
    """The module a LoRA tensor's key names: the key without its role (``lora_A``, ``lora_down``, ``alpha``, ...) and
    what follows it (``unet.x.to_q.lora_A.weight``, ``unet.x.to_q.lora_B.default.weight`` -> ``unet.x.to_q``; kohya's
    ``lora_unet_x_to_q.lora_down.weight`` and ``.alpha`` -> ``lora_unet_x_to_q``; diffusers' old attention-processor
    ``x.processor.to_q_lora.down.weight`` -> ``x.processor.to_q_lora``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if i and (part in _LORA_PARTS or (part in ("down", "up") and parts[i - 1].endswith("lora"))):
            return ".".join(parts[:i])
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in ("weight", "bias") else key


def _file_keys(file: Path, given) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise TargetError(f"--lora {given}: {file.name} is not a readable safetensors file "
                          f"({str(e).splitlines()[0]}).") from e


def _adapter_layers(roots: list[tuple[str, torch.nn.Module]], adapter: str) -> list[tuple[str, torch.nn.Module]]:
    """The peft layers (``component.module`` name, layer) that carry ``adapter`` in the modules ``roots``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for comp, root in roots:
        for name, m in root.named_modules():
            if isinstance(m, BaseTunerLayer) and any(adapter in getattr(m, part, {})
                                                     for part in m.adapter_layer_names):
                found.append((f"{comp}.{name}" if comp else name, m))
    return found


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """Two sums over a tensor's bit patterns: any change of its bytes changes them (barring an exact cancellation in
    both). Far cheaper than keeping a copy of every weight an adapter touches."""
    bits = t.detach().contiguous().reshape(-1).view(_INT_VIEW[t.element_size()]).to(torch.int64)
    return int(bits.sum()), int((bits * bits).sum())


def _base_tensors(layers: list[tuple[str, torch.nn.Module]]) -> list[torch.nn.Parameter]:
    """The plain weights (and biases) beneath adapter layers: what fusing changes, in place."""
    out = []
    for _, layer in layers:
        out += list(layer.get_base_layer().parameters(recurse=False))
    return out


@contextlib.contextmanager
def _library_output():
    """Hold diffusers', peft's and transformers' log records and warnings while an adapter loads (a mismatching
    adapter makes them print a hundred lines); the caller turns what matters into one line. Yields the list the
    messages (first lines) are collected in; they are repeated at debug level afterwards."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    keep, saved = _Keep(), []
    for name in ("diffusers", "peft", "transformers"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers, lg.propagate = [keep], False
        lg.setLevel(min(lg.level or logging.WARNING, logging.WARNING))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield messages
            finally:
                messages += [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        for text in messages:
            lines = str(text).splitlines() or [""]
            logger.debug("while loading the adapter: %s%s", lines[0][:300],
                         f" (+{len(lines) - 1} lines)" if len(lines) > 1 else "")


def _refusal(error: Exception, given, where: str) -> TargetError:
    """One line for an adapter that diffusers or peft could not load: the first mismatching key and its shapes when
    the shapes differ, else the first line of the error."""
    text = str(error)
    m = _SIZE_MISMATCH.search(text)
    if m:
        key, theirs, ours = m.group(1), *(", ".join(m.group(i).replace(" ", "").split(",")) for i in (2, 3))
        key = re.sub(r"\.(memaudit(_\d+)?)\.(weight|bias)$", r".\3", key).removeprefix("base_model.model.")
        owner = _STATE_DICT_OF.search(text)
        whose = f" of the {owner.group(1)}" if owner else ""
        return TargetError(f"--lora {given} is for another architecture than {where}: its first mismatching key, "
                           f"{key}{whose}, has shape ({theirs}) where the model has ({ours}); pass an adapter trained "
                           "for this base model.")
    first = text.splitlines()[0] if text.strip() else type(error).__name__
    return TargetError(f"--lora {given} could not be applied to {where} ({first[:300]}); pass an adapter trained for "
                       "this base model.")


def _merge_peft_adapter(target: Target, path: Path, given, scale: float) -> dict:
    """For families whose diffusers pipeline has no LoRA loader (PixArt): a peft adapter folder
    (``adapter_config.json`` + ``adapter_model.safetensors``, what ``memaudit finetune --method lora`` writes for them),
    merged into the denoiser at ``scale``. Returns what it loaded (:func:`apply_lora`'s record)."""
    if not (path.is_dir() and (path / "adapter_config.json").is_file()
            and (path / "adapter_model.safetensors").is_file()):
        raise TargetError(f"--lora {given}: diffusers has no LoRA loader for {target.family.title} pipelines; pass a "
                          "peft adapter folder (adapter_config.json + adapter_model.safetensors), as memaudit finetune "
                          "--method lora writes for this family.")
    from peft import PeftModel

    file = path / "adapter_model.safetensors"
    keys = _file_keys(file, given)
    try:
        model = PeftModel.from_pretrained(target.denoiser, str(path), adapter_name="memaudit", use_safetensors=True)
    except ValueError as e:
        from peft.utils.error import NoMatchingPeftModuleError

        if isinstance(e, NoMatchingPeftModuleError):  # its target modules name none of the denoiser's
            raise _no_match(given, file, len(keys), target) from e
        raise
    layers = _adapter_layers([("", model)], "memaudit")
    named = {lora_module_name(k).removeprefix("base_model.model.") for k in keys}
    injected = {n.removeprefix("base_model.model.") for n, _ in layers}
    matched = len(named & injected)
    if not matched:
        target.denoiser = model.unload()
        raise _no_match(given, file, len(keys), target)
    tensors = _base_tensors(layers)
    before = [_fingerprint(t) for t in tensors]
    if float(scale) != 1.0:
        for _, module in layers:
            module.scale_layer(float(scale))
    target.denoiser = model.merge_and_unload()
    return {"file": file, "keys": len(keys), "modules_named": len(named), "modules_matched": matched,
            "changed": before != [_fingerprint(t) for t in tensors],
            "config_sha256": file_sha256(path / "adapter_config.json")}


def _fuse_diffusers_lora(target: Target, path: Path, given, scale: float) -> dict:
    """diffusers' own loader (its format and the community formats it converts), fused at ``scale``. Returns what
    it loaded (:func:`apply_lora`'s record)."""
    name = f"memaudit_{len(target.loras)}"
    file = path if path.is_file() else sorted(f for f in path.glob("*.safetensors") if f.is_file())[0]
    keys = _file_keys(file, given)
    pipe = target.pipe
    roots = [(c, m) for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)]
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name, use_safetensors=True)
    except ValueError as e:
        from peft.utils.error import NoMatchingPeftModuleError

        if isinstance(e, NoMatchingPeftModuleError):  # peft found none of the modules the keys name
            raise _no_match(given, file, len(keys), target) from e
        raise
    layers = _adapter_layers(roots, name)
    if not layers:  # the keys name no component the pipeline has (diffusers skips them with a warning)
        pipe.unload_lora_weights()
        raise _no_match(given, file, len(keys), target)
    tensors = _base_tensors(layers)
    before = [_fingerprint(t) for t in tensors]
    pipe.fuse_lora(lora_scale=float(scale), adapter_names=[name])
    pipe.unload_lora_weights()
    return {"file": file, "keys": len(keys), "modules_named": len({lora_module_name(k) for k in keys}),
            "modules_matched": len(layers), "changed": before != [_fingerprint(t) for t in tensors]}


def _no_match(given, file: Path, n_keys: int, target: Target) -> TargetError:
    return TargetError(f"--lora {given}: none of the {n_keys} keys of {file.name} matched a module of "
                       f"{target.path or 'the model'} ({target.family.title}), so it would change nothing; pass an "
                       "adapter trained for this base model.")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (:func:`memaudit.core.digests.sha256_file`), or of a folder's files (sorted relative names and
    contents)."""
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def lora_scale(scale) -> float:
    """``--lora-scale`` as a finite float; TargetError naming the option otherwise."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TargetError(f"--lora-scale {scale!r} is not a number; pass one such as 1 or 0.5.") from None
    if not math.isfinite(value):
        raise TargetError(f"--lora-scale {scale} is not a finite number; pass one such as 1 or 0.5.")
    return value


def apply_lora(target: Target, lora: str | os.PathLike, scale: float = 1.0) -> None:
    """Apply a LoRA adapter (a ``.safetensors`` file diffusers' ``load_lora_weights`` reads, or a folder holding
    exactly one) to the target's denoiser (and text encoders, where the adapter has them), fused at ``scale`` so the
    audited weights are the base's plus the adapter's.

    Refused in one line (TargetError): a scale that is not finite; a folder with several ``.safetensors`` files
    (which one is meant?); an adapter none of whose keys matches a module of the model, or that changes no weight
    at a non-zero scale; an adapter of another architecture (its first mismatching key and the two shapes).
    diffusers' and peft's own output while loading is held back (repeated at debug level). An adapter that matches
    only some of the modules its keys name is applied with a warning. ``target.loras`` records ``path`` (as given,
    resolved), ``file`` (the safetensors file loaded) and its ``sha256``, ``scale``, ``keys`` (tensors in the file),
    ``modules_named`` (modules its keys name) and ``modules_matched`` (modules of the model it was applied to), and
    ``partial`` (fewer matched than named); a peft adapter folder also its ``config_sha256``.
    """
    scale = lora_scale(scale)
    p = Path(lora).expanduser()
    if not p.exists():
        raise TargetError(f"--lora {lora} does not exist; pass a LoRA .safetensors file or the folder holding one.")
    if p.is_dir():
        found = sorted(f.name for f in p.glob("*.safetensors") if f.is_file())
        if not found:
            raise TargetError(f"--lora {lora} holds no .safetensors file; memaudit loads adapters only from "
                              "safetensors.")
        if len(found) > 1:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            hint = (f"pass the one to apply, e.g. --lora {p / found[0]}" if hasattr(target.pipe, "load_lora_weights")
                    else "keep only adapter_model.safetensors beside adapter_config.json")
            raise TargetError(f"--lora {lora} holds {len(found)} adapter files ({shown}); {hint}.")
    elif p.suffix != ".safetensors":
        raise TargetError(f"--lora {lora} is not a .safetensors file; memaudit never unpickles weights: convert it.")
    from safetensors import SafetensorError

    where = target.path or "the model"
    apply = _fuse_diffusers_lora if hasattr(target.pipe, "load_lora_weights") else _merge_peft_adapter
    with _library_output():
        try:
            loaded = apply(target, p, lora, scale)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
            raise _refusal(e, lora, where) from e
    if scale != 0.0 and not loaded["changed"]:
        raise TargetError(f"--lora {lora} changes no weight of {where}: its {loaded['modules_matched']} module(s) add "
                          f"zero at scale {scale:g} (an untrained adapter?); pass a trained adapter.")
    for _, m in target.modules():
        m.eval()
        m.requires_grad_(False)
    target.clear_prompt_cache()
    file = loaded["file"]
    record = {"path": str(p.resolve()), "file": str(file.resolve()), "sha256": file_sha256(file), "scale": scale,
              "keys": loaded["keys"], "modules_named": loaded["modules_named"],
              "modules_matched": loaded["modules_matched"],
              "partial": loaded["modules_matched"] < loaded["modules_named"]}
    if "config_sha256" in loaded:
        record["config_sha256"] = loaded["config_sha256"]
    if record["partial"]:
        logger.warning("--lora %s matched only %d of the %d modules its %d keys name in %s; the others are not "
                       "applied (results.json records the counts)", lora, loaded["modules_matched"],
                       loaded["modules_named"], loaded["keys"], where)
    target.loras.append(record)
