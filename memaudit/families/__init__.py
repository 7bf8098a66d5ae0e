"""Model families: one file each, one registry line each (:data:`FAMILIES`).

A family is found from ``model_index.json``'s ``_class_name`` (:func:`family_for_class`), from an in-memory
pipeline's class (:func:`family_of`) or from its denoiser's class (:func:`family_for_denoiser`). See
:mod:`memaudit.families.base` for what a family provides, :mod:`memaudit.families.pipeline` for sampling through the
family's pipeline, and :mod:`memaudit.families.tiny` for what the families' tiny test pipelines share.
"""

from __future__ import annotations

from memaudit.families.base import Conditioning, DDPMFamily, Family, FlowMatchingFamily
from memaudit.families.flux import Flux
from memaudit.families.pipeline import PipelineRun, sample
from memaudit.families.pixart import PixArt
from memaudit.families.sd import StableDiffusion
from memaudit.families.sd3 import StableDiffusion3
from memaudit.families.sdxl import StableDiffusionXL

__all__ = ["FAMILIES", "Conditioning", "DDPMFamily", "Family", "FlowMatchingFamily", "PipelineRun", "family_for_class",
           "family_for_denoiser", "family_of", "sample", "supported_text"]

#: name -> family, in the order messages list them
FAMILIES: dict[str, Family] = {f.name: f for f in (
    StableDiffusion(),
    StableDiffusionXL(),
    StableDiffusion3(),
    Flux(),
    PixArt(),
)}


def family_for_class(class_name: str) -> Family | None:
    """The family whose diffusers pipeline class is ``class_name`` (None if memaudit has none)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    return None


def family_of(pipe) -> Family | None:
    """The family of an in-memory diffusers pipeline, by its class (or a base class)."""
    for cls in type(pipe).__mro__:
        family = family_for_class(cls.__name__)
        if family is not None:
            return family
    return None


def family_for_denoiser(denoiser) -> Family | None:
    """The family whose denoiser class (its component's accepted class names) is ``denoiser``'s class or a base
    class of it, the first in :data:`FAMILIES` order where several share one (SD and SDXL share
    ``UNet2DConditionModel``, and its block layout); None if memaudit has none."""
    for cls in type(denoiser).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ in family.components.get(family.denoiser_name, ()):
                return family
    return None


def supported_text() -> str:
    """One line naming what memaudit audits."""
    names = ", ".join(f"{f.title} ({'/'.join(f.pipeline_classes)})" for f in FAMILIES.values())
    return f"memaudit audits diffusers text-to-image pipeline folders of these families: {names}; weights as safetensors"
