"""The PEFT methods by name: registering, finding and building them, and what the bits of their masks stand for.

``get_method(name, denoiser, granularity)`` builds one on a diffusers denoiser, UNet or transformer (changing it in
place, see :mod:`memaudit.peft.base`). Adding a method takes one new file with a :class:`PEFTMethod` subclass and
one ``register_method`` line below; a ``"module:Class"`` string registers it without importing it until it is used.

``list_units(base, name, granularity)`` (``memaudit mitigate units``) says what the bits of a mask stand for.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from memaudit.core.errors import ConfigError
from memaudit.peft.base import PEFTMethod
from memaudit.peft.units import GRANULARITIES
from memaudit.target import load_target

__all__ = ["UnitInfo", "available_methods", "get_method", "list_units", "method_class", "register_method",
           "unit_table"]

_REGISTRY: dict[str, type[PEFTMethod] | str] = {}
_RESOLVED: dict[str, type[PEFTMethod]] = {}


def register_method(name: str, cls: type[PEFTMethod] | str) -> None:
    """Make ``cls`` (a :class:`PEFTMethod` subclass, or its ``"module:Class"`` path) available as ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be an identifier")
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"method path {cls!r} must look like 'package.module:Class'")
    elif not (isinstance(cls, type) and issubclass(cls, PEFTMethod)):
        raise ValueError(f"method {name!r} must be a PEFTMethod subclass, not {cls!r}")
    previous = _REGISTRY.get(name)
    if previous is not None and previous != cls:
        raise ValueError(f"a different method is already registered as {name!r}")
    _REGISTRY[name] = cls
    _RESOLVED.pop(name, None)


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def method_class(name: str) -> type[PEFTMethod]:
    """The class registered as ``name`` (ConfigError listing the available names for an unknown one)."""
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ConfigError(f"unknown PEFT method {name!r}; available: {', '.join(available_methods())}.")
    if isinstance(entry, str):
        if name not in _RESOLVED:
            module, _, attr = entry.partition(":")
            _RESOLVED[name] = getattr(importlib.import_module(module), attr)
        entry = _RESOLVED[name]
    return entry


def get_method(name: str, denoiser, granularity: str = "block", *, base: str | os.PathLike | None = None) -> PEFTMethod:
    """Build the method ``name`` on ``denoiser`` (in place) with ``block`` or ``layer`` units; ``base``, the model the
    denoiser was loaded from, is only used to name it in messages (a mask of the wrong length)."""
    cls = method_class(name)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}; "
                          "use block (one unit per transformer block) or layer (one unit per layer).")
    method = cls(denoiser, granularity=granularity)
    method.base = str(base) if base is not None else None
    return method


@dataclass(frozen=True)
class UnitInfo:
    """One bit of a method's mask, described: its position, name, size and share of the whole denoiser."""

    index: int
    name: str
    parameters: int
    #: the share of the whole denoiser (the historical name, which ``memaudit mitigate units`` prints)
    percent_of_unet: float

    @property
    def percent_of_denoiser(self) -> float:
        """:attr:`percent_of_unet` under the family-agnostic name."""
        return self.percent_of_unet


def unit_table(method: PEFTMethod) -> list[UnitInfo]:
    """``method``'s units in mask order (bit ``index`` of a mask switches unit ``index``); their ``parameters`` sum to
    the method's trainable parameter count."""
    denoiser_parameters = max(method.summary()["unet_parameters"], 1)
    return [UnitInfo(i, u.name, u.count, 100.0 * u.count / denoiser_parameters) for i, u in enumerate(method.units())]


def list_units(base: str | os.PathLike, name: str, granularity: str = "block", device: str = "cpu") -> list[UnitInfo]:
    """The units of method ``name`` at ``granularity`` on the denoiser of the pipeline ``base`` (loaded with
    :func:`memaudit.target.load_target`), in mask order."""
    method_class(name)  # an unknown method stops before the model is loaded
    if granularity not in GRANULARITIES:
        raise ConfigError(f"--granularity {granularity!r} is not known; use block or layer.")
    target = load_target(base, device=device, dtype="float32")
    return unit_table(get_method(name, target.denoiser, granularity, base=base))


register_method("full", "memaudit.peft.full:FullFineTuning")
register_method("freeze", "memaudit.peft.freeze:Freeze")
register_method("bias", "memaudit.peft.bias:BiasTuning")
register_method("norm", "memaudit.peft.norm:NormTuning")
register_method("attention", "memaudit.peft.attention:AttentionTuning")
register_method("svdiff", "memaudit.peft.svdiff:SVDiff")
register_method("difffit", "memaudit.peft.difffit:DiffFit")
register_method("lora", "memaudit.peft.lora:LoRA")
