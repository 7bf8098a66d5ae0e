"""Load a diffusers text-to-image checkpoint of any supported family as an audit *target*.

A :class:`Target` holds a diffusers pipeline and its :mod:`family <memaudit.families>` (Stable Diffusion 1.x/2.x,
SDXL, SD3, Flux, PixArt), and gives the audit what it needs in one place: prompt conditioning (cached), the noise
prediction *in epsilon space* whatever the model predicts (epsilon, v, sample or a flow velocity), noising and
training targets, and the latent encode/decode of images.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memaudit.core.devices import resolve_device, resolve_dtype
from memaudit.core.digests import sha256_file
from memaudit.core.errors import TargetError
from memaudit.families import Conditioning, Family, family_for_class, family_of, supported_text
from memaudit.families.base import PREDICTION_TYPES, output_to_eps, training_target
from memaudit.families.blackbox import BlackBox, black_box_refusal

logger = logging.getLogger(__name__)

__all__ = ["PREDICTION_TYPES", "Target", "from_pipeline", "load_target", "output_to_eps", "resolve_device",
           "resolve_dtype", "training_target"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(eq=False)
class Target:
    """A loaded text-to-image pipeline of a known :mod:`family <memaudit.families>`: its parts, where they run,
    cached prompt conditioning, and the family's noise prediction in eps space."""

    pipe: Any
    family: Family
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    path: str = ""
    #: LoRA adapters applied to the base, in order: [{"path", "file", "sha256", "scale", "keys", "modules_named",
    #: "modules_matched", "partial"}, ...] (see :func:`apply_lora`)
    loras: list = field(default_factory=list)
    _prompt_cache: dict = field(default_factory=dict, repr=False)

    # -- parts -----------------------------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser(self.pipe)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self.pipe, self.family.denoiser_name, module)

    # the denoiser under its Stable Diffusion name, for code written before the other families
    unet = denoiser

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, n) for n in self.family.text_encoder_names if getattr(self.pipe, n, None) is not None]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return getattr(self.pipe, self.family.text_encoder_names[0])

    @property
    def tokenizer(self):
        return getattr(self.pipe, self.family.tokenizer_names[0])

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Every torch module of the pipeline, by component name (denoiser first)."""
        names = self.family.module_names(self.pipe)
        return [(n, getattr(self.pipe, n)) for n in names if isinstance(getattr(self.pipe, n, None), torch.nn.Module)]

    # -- facts about the model -------------------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        """``epsilon``, ``v_prediction`` or ``sample`` (DDPM-type families), or ``flow`` (flow matching)."""
        return self.family.prediction_type(self.pipe)

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor(self.pipe)

    @property
    def resolution(self) -> int:
        """Side of the images the model generates by default, in pixels."""
        return self.family.resolution(self.pipe)

    @property
    def image_channels(self) -> int:
        return self.family.image_channels(self.pipe)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.family.latent_shape(self.pipe, self.resolution)

    @property
    def scaling_factor(self) -> float:
        return self.family.latent_scaling(self.pipe)[0]

    @property
    def shift_factor(self) -> float:
        return self.family.latent_scaling(self.pipe)[1]

    @property
    def num_train_timesteps(self) -> int:
        return self.family.num_train_timesteps(self.pipe)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alpha_bar`` of every training timestep (DDPM-type families only)."""
        if self.family.flow:
            raise TargetError(f"{self.family.title} is a flow-matching model: it has no alphas_cumprod.")
        return self.family.alphas_cumprod(self.pipe)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_bar_t`` for timesteps ``t`` (a tensor), on the CPU in float32 (DDPM-type families only)."""
        if self.family.flow:
            raise TargetError(f"{self.family.title} is a flow-matching model: it has no alphas_cumprod.")
        return self.family.alpha_bar(self.pipe, torch.as_tensor(t).detach().cpu().reshape(-1)).cpu()

    # -- noise, in the family's terms ------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps for ``n`` samples (scheduler units), drawn from ``generator``."""
        return self.family.sample_timesteps(self.pipe, n, generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t`` of clean scaled latents ``x0`` noised with ``noise`` at timesteps ``t``."""
        return self.family.add_noise(self.pipe, x0, noise, t)

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser is trained to output for ``add_noise(x0, noise, t)``."""
        return self.family.training_target(self.pipe, x0, noise, t)

    def pure_noise_timestep(self) -> torch.Tensor:
        return self.family.pure_noise_timestep(self.pipe)

    # -- prompts ---------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The first text encoder's ids and attention mask, as the family's encoding feeds them to it
        (:meth:`memaudit.families.base.Family.tokenize`)."""
        return {k: v.to(self.device) for k, v in self.family.tokenize(self.pipe, list(prompts)).items()}

    def embed(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts`` (with gradient when enabled; no caching)."""
        return self.family.encode(self.pipe, list(prompts), self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning of batch ``len(prompts)`` for inference; each distinct prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            encoders = self.text_encoders
            modes = [m.training for m in encoders]
            for m in encoders:
                m.eval()
            cond = self.embed(missing)
            for m, mode in zip(encoders, modes):
                m.train(mode)
            for i, p in enumerate(missing):
                self._prompt_cache[p] = cond[i].detach()
        return Conditioning.cat([self._prompt_cache[p] for p in prompts])

    @torch.no_grad()
    def unconditional(self, n: int = 1) -> Conditioning:
        """The unconditional conditioning the pipeline guides with (the empty prompt; SDXL: zeros), ``n`` times."""
        if "\0uncond" not in self._prompt_cache:
            self._prompt_cache["\0uncond"] = self.family.unconditional(self.pipe, self.device).detach()
        return self._prompt_cache["\0uncond"].repeat(n)

    empty_embedding = unconditional

    def clear_prompt_cache(self) -> None:
        """Forget cached conditioning (call after changing a text encoder)."""
        self._prompt_cache.clear()

    # -- noise prediction ------------------------------------------------------------------------------------
    def to_score(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A raw denoiser output in the family's score space (:meth:`Family.score_output`)."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.score_output(self.pipe, output, x_t, t)

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.to_eps(self.pipe, output, x_t, t)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                guidance: float | None = None) -> torch.Tensor:
        """The raw denoiser output (in the model's own prediction type) for unpacked latents ``x_t``; ``guidance``
        reaches denoisers that embed it (Flux dev; None: the family's default)."""
        cond = _as_conditioning(cond).to(self.device, self.dtype)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        kw = {"guidance": guidance} if guidance is not None and self.family.embedded_guidance else {}
        return self.family.denoise(self.pipe, x_t.to(self.dtype), t, cond, **kw)

    unet_output = denoise

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                    guidance: float | None = None) -> torch.Tensor:
        """Noise prediction in epsilon space (float32), whatever the model predicts."""
        t = torch.as_tensor(t, device=x_t.device)
        return self.to_eps(self.denoise(x_t, t, cond, guidance), x_t, t)

    def predict_score(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning | torch.Tensor,
                      guidance: float | None = None) -> torch.Tensor:
        """The prediction in the family's score space (:meth:`Family.score_output`: eps, or a flow's velocity):
        the denoising strength is the norm of its conditional minus unconditional difference."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return self.family.score_output(self.pipe, self.denoise(x_t, t, cond, guidance), x_t, t)

    # -- images <-> latents ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of the VAE posterior as latents: ``(mean - shift) * scaling`` and
        ``std * scaling``."""
        scale, shift = self.family.latent_scaling(self.pipe)
        means, stds = [], []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            means.append((dist.mean.float() - shift) * scale if shift else dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images in [-1, 1], float32, from scaled latents."""
        scale, shift = self.family.latent_scaling(self.pipe)
        out = []
        for i in range(0, len(latents), batch_size):
            z = latents[i : i + batch_size].to(self.device, self.dtype) / scale
            if shift:
                z = z + shift
            out.append(self.vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out)

    @torch.no_grad()
    def round_trip(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Images passed through the VAE (posterior mean): the best the decoder can do for them."""
        return self.decode_latents(self.encode_images(images, batch_size)[0], batch_size)

    # -- pipelines -------------------------------------------------------------------------------------------
    def pipeline(self):
        """The diffusers pipeline (its modules are this target's)."""
        return self.pipe

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a diffusers pipeline folder atomically (safetensors), the denoiser and VAE optionally cast to
        ``dtype`` (text encoders stay float32: transformers keeps a text encoder's saved dtype, and plain diffusers
        loads the rest in float32, so a half-precision text encoder would break ``from_pretrained(path)``)."""
        import copy

        from memaudit.core.io import atomic_directory

        pipe = self.pipe
        if dtype is not None and dtype != self.dtype:
            pipe = copy.deepcopy(pipe)
            self.family.denoiser(pipe).to(dtype=dtype)
            pipe.vae.to(dtype=dtype)
            for name in self.family.text_encoder_names:
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to(dtype=torch.float32)
        with atomic_directory(path) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        return Path(path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> Target:
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            self.dtype = resolve_dtype(dtype)
        for _, m in self.modules():
            if next(m.parameters()).dtype == self.dtype:
                m.to(self.device)
            else:
                m.to(device=self.device, dtype=self.dtype)
        self._prompt_cache.clear()
        return self


def _as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning({"prompt_embeds": cond})


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
