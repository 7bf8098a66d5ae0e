"""PEFT methods with maskable units, by name.

``get_method(name, unet, granularity)`` builds one on a diffusers UNet (changing it in place, see
:mod:`memaudit.mitigate.methods.base`). Adding a method takes one new file with a :class:`PEFTMethod` subclass and
one ``register_method`` line below; a ``"module:Class"`` string registers it without importing it until it is used.
"""

from __future__ import annotations

import importlib

from memaudit.errors import ConfigError
from memaudit.mitigate.methods.base import GRANULARITIES, PEFTMethod, Unit

__all__ = ["GRANULARITIES", "PEFTMethod", "Unit", "available_methods", "get_method", "method_class", "register_method"]

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


def get_method(name: str, unet, granularity: str = "block") -> PEFTMethod:
    """Build the method ``name`` on ``unet`` (in place) with ``block`` or ``layer`` units."""
    cls = method_class(name)
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}; "
                          "use block (one unit per transformer block) or layer (one unit per layer).")
    return cls(unet, granularity=granularity)


register_method("full", "memaudit.mitigate.methods.full:FullFineTuning")
register_method("freeze", "memaudit.mitigate.methods.freeze:Freeze")
register_method("bias", "memaudit.mitigate.methods.bias:BiasTuning")
register_method("norm", "memaudit.mitigate.methods.norm:NormTuning")
register_method("attention", "memaudit.mitigate.methods.attention:AttentionTuning")
register_method("svdiff", "memaudit.mitigate.methods.svdiff:SVDiff")
register_method("difffit", "memaudit.mitigate.methods.difffit:DiffFit")
register_method("lora", "memaudit.mitigate.methods.lora:LoRA")
