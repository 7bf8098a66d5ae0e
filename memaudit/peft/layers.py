"""The layers PEFT methods look for and the modules they install in their place.

- Layer kinds: normalization layers (:func:`is_norm`, whose affine parameters the norm-based methods train) and
  diffusers' attention modules (:func:`is_attention`).
- :class:`Wrapper`: the base of every module a method installs in place of a plain layer (SV-DIFF's spectral shifts,
  DiffFit's scaled outputs), which keeps the layer's own parameters under their original names and gives the plain
  layer back, merged or not; :func:`replace_module` puts a module at a qualified name.
- :func:`is_peft_layer`: a layer the ``peft`` library installed (LoRA's).
"""

from __future__ import annotations

import abc
from functools import lru_cache

import torch

__all__ = ["NORM_TYPES", "Wrapper", "attention_types", "is_attention", "is_norm", "is_peft_layer", "norm_types",
           "replace_module"]

#: the torch normalization layers whose affine parameters the norm-based methods train (see :func:`norm_types` for
#: the full set, which adds diffusers' own ``RMSNorm``)
NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)


# -- layer kinds ----------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def norm_types() -> tuple[type, ...]:
    """Normalization layers with (optional) affine parameters: torch's ``GroupNorm``, ``LayerNorm`` (and subclasses
    such as diffusers' ``FP32LayerNorm``), ``RMSNorm`` (Flux's query/key norms), and diffusers' own ``RMSNorm`` (SD3.5's
    query/key norms). Adaptive norms (``AdaLayerNorm*``) are a plain norm without affine parameters plus ``Linear``
    layers, which count as ``Linear`` layers."""
    try:
        from diffusers.models.normalization import RMSNorm
    except ImportError:  # pragma: no cover - every supported diffusers has it
        return NORM_TYPES
    return (*NORM_TYPES, RMSNorm)


def is_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalization layer of :func:`norm_types` (with or without affine parameters)."""
    return isinstance(module, norm_types())


@lru_cache(maxsize=1)
def attention_types() -> tuple[type, ...]:
    """diffusers' attention modules: ``Attention`` (UNets, SD3, PixArt) and every ``AttentionModuleMixin`` class
    (``FluxAttention`` and the other attention classes of newer transformers)."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # pragma: no cover - older diffusers
        return (Attention,)
    return (Attention, AttentionModuleMixin)


def is_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a diffusers attention module (see :func:`attention_types`)."""
    return isinstance(module, attention_types())


# -- installed modules ---------------------------------------------------------------------------------------------
def replace_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` inside ``root`` (works for ``ModuleList`` children such as ``to_out.0``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class Wrapper(torch.nn.Module, abc.ABC):
    """Base of the modules a method installs in place of a plain layer.

    The wrapper re-registers the layer's own parameters under their original names (so ``state_dict`` keys of the
    plain model stay valid) and keeps the layer object itself, stripped of its tensors and out of the module tree,
    to put back on :meth:`restore` (with the adaptation merged) or :meth:`unwrap` (without).
    """

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.weight = layer.weight
        self.bias = getattr(layer, "bias", None)  # torch's RMSNorm has no bias attribute at all
        layer.weight = None
        if hasattr(layer, "bias"):
            layer.bias = None
        object.__setattr__(self, "_plain", layer)  # not a child: invisible to state_dict, parameters() and .to()
        self.train(layer.training)

    def __getattr__(self, name: str):
        # the plain layer's other attributes (in_features, kernel_size, eps, ...) read through the wrapper: pipelines
        # read them (SDXL's reads add_embedding.linear_1.in_features)
        try:
            return super().__getattr__(name)
        except AttributeError:
            plain = self.__dict__.get("_plain")
            if plain is None or name in ("weight", "bias"):
                raise
            return getattr(plain, name)

    @property
    def plain_type(self) -> str:
        return type(self._plain).__name__

    @abc.abstractmethod
    def merged_weight(self) -> torch.Tensor:
        """The plain layer's weight with the adaptation baked in."""

    def merged_bias(self) -> torch.Tensor | None:
        return self.bias

    @torch.no_grad()
    def restore(self) -> torch.nn.Module:
        """The plain layer, carrying the merged weight and bias (the same ``Parameter`` objects as before)."""
        weight, bias = self.merged_weight(), self.merged_bias()
        if weight is not self.weight:
            self.weight.copy_(weight)
        if bias is not None and bias is not self.bias:
            self.bias.copy_(bias)
        return self.unwrap()

    def unwrap(self) -> torch.nn.Module:
        """The plain layer with its own weight and bias (the same ``Parameter`` objects, not merged: the adaptation
        is dropped)."""
        layer = self._plain
        layer.weight = self.weight
        if hasattr(layer, "bias"):
            layer.bias = self.bias
        layer.train(self.training)
        return layer

    def extra_repr(self) -> str:
        return f"wraps {self.plain_type}"


def is_peft_layer(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a layer the ``peft`` library installed (LoRA's)."""
    return type(module).__module__.startswith("peft.")
