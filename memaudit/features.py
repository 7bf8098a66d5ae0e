"""Image feature extractors: turn generated or training images into vectors for nearest-neighbour search.

Every extractor is a :class:`FeatureExtractor`: a frozen ``nn.Module`` plus an optional preprocessing function,
run in evaluation mode without gradients, in batches, on a chosen device. Inputs are float tensors
``[N, C, H, W]`` with values in ``[0, 1]`` and ``C`` = 1 or 3; outputs are ``[N, dim]`` float32 tensors on the CPU.

Built-in extractors (see :func:`available`), chosen by name with :func:`get_extractor`:

``pixels``
    The images resized to ``size`` x ``size`` (bilinear, antialiased; default 32) and flattened; ``grayscale=true``
    first converts RGB to luma. A cheap baseline that needs no weights.
``open_clip``
    The image tower of an OpenCLIP model: ``model`` is the architecture name (default ``ViT-B-32``), ``weights`` a
    local checkpoint file (required: memaudit never downloads anything).
``torchscript``
    A user's own TorchScript image model, e.g. an SSCD copy-detection descriptor: ``path`` is the file, ``size`` the
    square input resolution (default 224).
``inception``
    The FID Inception-v3 network of torchmetrics (pool features, 2048-d); ``weights`` is the local FID Inception
    weights file (``pt_inception-2015-12-05-6726825d.pth``); it needs the ``torch-fidelity`` package.

Adding an extractor takes one factory function and one :func:`register` line; a factory takes ``device``,
``batch_size`` and the user's options as keywords and returns a :class:`FeatureExtractor`.

Weights are only ever read with ``safetensors`` or ``torch.load(..., weights_only=True)``; TorchScript files are
read with ``torch.jit.load``, the documented way to load one's own TorchScript model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memaudit.core import plugins
from memaudit.core.devices import resolve_device
from memaudit.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = ["FeatureExtractor", "get_extractor", "available", "register", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _resolve_device(device: str | torch.device) -> torch.device:

    return resolve_device(device)


class FeatureExtractor:
    """A frozen image encoder: ``extractor(images)`` maps ``[N, C, H, W]`` images in [0, 1] to ``[N, dim]`` features.

    Args:
        module: the network; it is moved to ``device`` and put in evaluation mode. It must return one tensor
            with one row per image (extra dimensions are flattened).
        name: a short name used in logs and reports.
        preprocess: applied to each batch on ``device`` before ``module`` (resizing, normalization); ``None``
            passes the images as they are.
        device: where the network runs.
        batch_size: how many images go through the network at once.
        probe_shape: if given, a zero batch of this shape (e.g. ``(1, 3, 224, 224)``) is run at construction to
            discover :attr:`dim` and to fail early on an incompatible network. Without it, :attr:`dim` is ``None``
            until the first call.
    """

    def __init__(self, module: nn.Module, name: str, preprocess: Callable[[Tensor], Tensor] | None,
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 probe_shape: tuple[int, ...] | None = None):
        if not isinstance(module, nn.Module):
            raise ConfigError(f"feature extractor {name!r}: expected a torch nn.Module, got {type(module).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r})")
        self.name = name
        self.device = _resolve_device(device)
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.module = module.to(self.device).eval()  # forward passes run under torch.no_grad()
        self._dim: int | None = None
        if probe_shape is not None:
            try:
                out = self._forward(torch.zeros(probe_shape, device=self.device))
            except Exception as e:  # the user's network may raise anything
                raise ConfigError(f"feature extractor {name!r} failed on a dummy batch of shape {list(probe_shape)}: "
                                  f"{_first_line(e)}") from e
            self._dim = int(out.shape[1])
        logger.debug("feature extractor %s on %s (dim %s)", name, self.device, self._dim)

    @property
    def dim(self) -> int | None:
        """Feature dimension; ``None`` only before the first call of an extractor built without a probe batch."""
        return self._dim

    def __repr__(self) -> str:
        return f"FeatureExtractor(name={self.name!r}, dim={self._dim}, device={str(self.device)!r})"

    @torch.no_grad()
    def _forward(self, x: Tensor) -> Tensor:
        if self.preprocess is not None:
            x = self.preprocess(x)
        out = self.module(x)
        if not isinstance(out, Tensor):
            raise ConfigError(f"feature extractor {self.name!r} returned {type(out).__name__}, not a tensor; wrap the "
                              "network so that it returns one [N, dim] tensor")
        if out.ndim == 0 or out.shape[0] != x.shape[0]:
            raise ConfigError(f"feature extractor {self.name!r} returned shape {list(out.shape)} for {x.shape[0]} "
                              "images; it must return one row per image")
        return out.reshape(out.shape[0], -1)

    def __call__(self, images: Tensor) -> Tensor:
        """Features of ``images`` (float ``[N, C, H, W]`` in [0, 1], C = 1 or 3): ``[N, dim]`` float32 on the CPU.

        The images are processed in batches of :attr:`batch_size`; they may live on any device.
        """
        if not isinstance(images, Tensor):
            raise ConfigError(f"images must be a torch tensor [N, C, H, W], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"images must have shape [N, C, H, W] with C = 1 or 3, got {list(images.shape)}")
        if not images.is_floating_point():
            raise ConfigError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
        n = images.shape[0]
        if n == 0:
            return torch.empty(0, self._dim or 0, dtype=torch.float32)
        chunks = []
        for start in range(0, n, self.batch_size):
            batch = images[start:start + self.batch_size].to(self.device, torch.float32)
            out = self._forward(batch).to("cpu", torch.float32)
            if self._dim is None:
                self._dim = int(out.shape[1])
            elif out.shape[1] != self._dim:
                raise ConfigError(f"feature extractor {self.name!r} returned {out.shape[1]} features per image, "
                                  f"expected {self._dim}; all images must have the same channels and size")
            chunks.append(out)
        return torch.cat(chunks).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register(name: str, factory: Callable[..., FeatureExtractor]) -> None:
    """Make ``factory`` available as ``get_extractor(name, ...)``.

    ``factory(device=..., batch_size=..., **options)`` must return a :class:`FeatureExtractor`; it should raise
    :class:`~memaudit.core.errors.ConfigError` for unknown or missing options.
    """
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"feature extractor name must be a non-empty string without spaces at the ends: {name!r}")
    if not callable(factory):
        raise ConfigError(f"feature extractor {name!r}: the factory must be callable")
    if name in _REGISTRY or name in plugins.names(plugins.FEATURE_EXTRACTORS):  # a plugin not loaded yet counts too
        raise ConfigError(f"feature extractor {name!r} is already registered; choose another name")
    _REGISTRY[name] = factory


def available() -> list[str]:
    """Names of the registered feature extractors, in registration order, then those installed packages declare as
    entry points (:mod:`memaudit.core.plugins`; the bundled demo's ``demo``)."""
    return plugins.names_beside(_REGISTRY, plugins.FEATURE_EXTRACTORS)


def get_extractor(name: str | nn.Module | FeatureExtractor, device: str | torch.device = "cpu", batch_size: int = 64,
                  **options: Any) -> FeatureExtractor:
    """Build a feature extractor by registered name, or wrap a user's ``nn.Module`` as it is.

    Args:
        name: a name from :func:`available`, or an ``nn.Module`` (run without preprocessing, named
            ``custom:<ClassName>``), or an existing :class:`FeatureExtractor` (returned unchanged).
        device: where the network runs.
        batch_size: images per forward pass.
        **options: extractor-specific settings (strings from the command line are accepted), e.g. ``size=16`` for
            ``pixels`` or ``weights=PATH`` for ``open_clip``.

    Raises:
        ConfigError: unknown name, unknown/missing option, or an unusable network.
        DataError: a weights file that cannot be read.
    """
    if isinstance(name, FeatureExtractor):
        if options:
            raise ConfigError(f"feature options {sorted(options)} cannot be applied to an already built extractor")
        return name
    if isinstance(name, nn.Module):
        if options:
            raise ConfigError(f"feature options {sorted(options)} do not apply to a custom nn.Module extractor; "
                              "remove them")
        return FeatureExtractor(name, f"custom:{type(name).__name__}", None, device=device, batch_size=batch_size)
    factory = plugins.resolve(_REGISTRY, plugins.FEATURE_EXTRACTORS, name) if isinstance(name, str) else None
    if factory is None:
        raise ConfigError(f"feature extractor {name!r} does not exist; choose one of: {', '.join(available())} "
                          "(or pass an nn.Module)")
    return factory(device=device, batch_size=batch_size, **options)


# --------------------------------------------------------------------------------------------------------------------
# Option parsing helpers (options may arrive as strings from `--feature-option key=value`)

def _check_options(extractor: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"feature extractor {extractor!r} has no option {unknown[0]!r}; its options are: "
                          f"{allowed_text}")


def _int_option(extractor: str, key: str, value: Any, minimum: int = 1) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = int(value)
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"feature option {key}={value!r} of {extractor!r} must be an integer") from None
    if number < minimum:
        raise ConfigError(f"feature option {key}={number} of {extractor!r} must be at least {minimum}")
    return number


def _bool_option(extractor: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"feature option {key}={value!r} of {extractor!r} must be true or false")


def _file_option(extractor: str, key: str, value: Any, hint: str) -> Path:
    if value is None or str(value).strip() == "":
        raise ConfigError(f"feature extractor {extractor!r} needs `--feature-option {key}=PATH`: {hint}")
    path = Path(os.path.expanduser(str(value)))
    if not path.is_file():
        raise ConfigError(f"feature option {key}={value} of {extractor!r}: no such file; give the path of a local file")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing helpers

def _to_rgb(x: Tensor) -> Tensor:
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


class _Normalize:
    """RGB -> resize -> (x - mean) / std; a picklable callable."""

    def __init__(self, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        x = _resize(_to_rgb(x), self.size)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


# --------------------------------------------------------------------------------------------------------------------
# pixels

_LUMA = (0.299, 0.587, 0.114)


class _Pixels:
    def __init__(self, size: int, grayscale: bool):
        self.size = size
        self.grayscale = grayscale

    def __call__(self, x: Tensor) -> Tensor:
        if self.grayscale and x.shape[1] == 3:
            weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(dim=1, keepdim=True)
        return _resize(x, (self.size, self.size))


def _pixels_factory(device: str | torch.device = "cpu", batch_size: int = 64, **options: Any) -> FeatureExtractor:
    """Raw pixels: resize to ``size`` (default 32) square, optionally ``grayscale``, flatten. ``dim`` = C*size*size,
    known after the first call (C is that of the images)."""
    _check_options("pixels", options, ("size", "grayscale"))
    size = _int_option("pixels", "size", options.get("size", 32))
    grayscale = _bool_option("pixels", "grayscale", options.get("grayscale", False))
    return FeatureExtractor(nn.Flatten(), "pixels", _Pixels(size, grayscale), device=device, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------------------------
# open_clip

class _OpenClipImage(nn.Module):
    """The image tower of an OpenCLIP model: ``encode_image`` (unnormalized embeddings)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _load_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file read with ``weights_only=True`` (never unpickled)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{what} file {path} cannot be read as safetensors or as a weights-only torch file "
                        f"({_first_line(e)}); give a .safetensors, .pt or .bin state dict") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{what} file {path} does not hold a state dict of tensors; give a .safetensors, .pt or .bin "
                        "state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _open_clip_factory(device: str | torch.device = "cpu", batch_size: int = 64, **options: Any) -> FeatureExtractor:
    """OpenCLIP image embeddings (``encode_image``) of architecture ``model`` with the local ``weights`` file.

    Images are made RGB, resized (bilinear, antialiased) to the model's ``visual.image_size`` and normalized with
    the model's mean/std (OpenAI's CLIP statistics for the OpenAI-style architectures).
    """
    _check_options("open_clip", options, ("model", "weights"))
    arch = str(options.get("model", "ViT-B-32")).strip()
    weights = _file_option("open_clip", "weights", options.get("weights"),
                           "a local OpenCLIP checkpoint (.safetensors, .pt or .bin), because memaudit never "
                           "downloads weights")
    if ":" in arch:  # hf-hub:..., local-dir:... would make open_clip fetch or read configs elsewhere
        raise ConfigError(f"feature option model={arch!r} of 'open_clip' must be a plain architecture name such as "
                          "ViT-B-32 (memaudit never downloads)")

    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if arch not in open_clip.list_models():
        raise ConfigError(f"feature option model={arch!r} of 'open_clip' is not an OpenCLIP architecture; see "
                          "open_clip.list_models() (e.g. ViT-B-32, ViT-L-14)")
    root = logging.getLogger()
    quiet = _DropMessage("No pretrained weights loaded")  # we load the weights ourselves, just below
    root.addFilter(quiet)
    try:
        model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    finally:
        root.removeFilter(quiet)

    state = _load_state_dict(weights, "open_clip weights")
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise DataError(f"open_clip weights file {weights} has no 'visual.*' tensors; is it an OpenCLIP checkpoint "
                        f"of {arch}?")
    try:
        model.visual.load_state_dict(visual, strict=True)
    except RuntimeError as e:
        raise DataError(f"open_clip weights file {weights} does not match architecture {arch} "
                        f"({_first_line(e)}); pass the matching `--feature-option model=ARCH`") from e
    del state  # only the image tower is used

    image_size = model.visual.image_size
    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", OPENAI_DATASET_STD))
    return FeatureExtractor(_OpenClipImage(model), f"open_clip:{arch}", _Normalize(size, mean, std), device=device,
                            batch_size=batch_size, probe_shape=(1, 3, *size))


# --------------------------------------------------------------------------------------------------------------------
# torchscript

def _torchscript_factory(device: str | torch.device = "cpu", batch_size: int = 64, **options: Any) -> FeatureExtractor:
    """A local TorchScript image model (``path``), fed RGB images resized to ``size`` (default 224) square and
    normalized with the ImageNet mean/std.

    This is the input convention of the SSCD copy-detection TorchScript models (``sscd_disc_mixup.torchscript.pt``
    and friends); SSCD's authors evaluate at ``size=288`` or ``320``.
    """
    _check_options("torchscript", options, ("path", "size"))
    path = _file_option("torchscript", "path", options.get("path"),
                        "give the path of a local TorchScript model file (e.g. an SSCD descriptor)")
    size = _int_option("torchscript", "size", options.get("size", 224))
    dev = _resolve_device(device)
    try:
        module = torch.jit.load(str(path), map_location=dev)
    except Exception as e:
        raise DataError(f"TorchScript file {path} cannot be loaded ({_first_line(e)}); give a file saved with "
                        "torch.jit.save") from e
    return FeatureExtractor(module, f"torchscript:{path.name}", _Normalize((size, size), IMAGENET_MEAN, IMAGENET_STD),
                            device=dev, batch_size=batch_size, probe_shape=(1, 3, size, size))


# --------------------------------------------------------------------------------------------------------------------
# inception (FID)

def _to_uint8_rgb(x: Tensor) -> Tensor:
    # Same conversion as torchmetrics' FrechetInceptionDistance(normalize=True): (x * 255).byte().
    return (_to_rgb(x).clamp(0, 1) * 255).to(torch.uint8)


def _inception_factory(device: str | torch.device = "cpu", batch_size: int = 64, **options: Any) -> FeatureExtractor:
    """torchmetrics' FID Inception-v3 (``inception-v3-compat``) 2048-d pool features, from local ``weights``.

    The images are made RGB and converted to uint8 as torchmetrics' FID does; the network resizes them to 299 px
    itself. The weights file is first checked with ``torch.load(weights_only=True)``.
    """
    _check_options("inception", options, ("weights",))
    weights = _file_option("inception", "weights", options.get("weights"),
                           "the FID Inception weights must be supplied as a local file "
                           "(pt_inception-2015-12-05-6726825d.pth), because memaudit does not download weights")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as e:  # pragma: no cover - torchmetrics is a dependency
        raise ConfigError(f"the inception extractor needs torchmetrics[image] ({_first_line(e)})") from e
    if not _TORCH_FIDELITY_AVAILABLE:
        raise ConfigError("the inception extractor needs the torch-fidelity package (pip install torch-fidelity); "
                          "or choose another feature extractor")
    state = _load_state_dict(weights, "Inception weights")  # proves the file holds tensors only
    load_path = weights
    tmp_path: Path | None = None
    if weights.suffix == ".safetensors":  # torch-fidelity reads torch files only: re-save the (safe) tensors
        import tempfile

        fd, name = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        tmp_path = Path(name)
        torch.save(state, tmp_path)
        load_path = tmp_path
    del state
    try:
        module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=str(load_path))
    except Exception as e:
        raise DataError(f"Inception weights file {weights} cannot be loaded into the FID Inception network "
                        f"({_first_line(e)})") from e
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
    return FeatureExtractor(module, "inception", _to_uint8_rgb, device=device, batch_size=batch_size,
                            probe_shape=(1, 3, 64, 64))


register("pixels", _pixels_factory)
register("open_clip", _open_clip_factory)
register("torchscript", _torchscript_factory)
register("inception", _inception_factory)

