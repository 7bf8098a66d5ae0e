"""Units: how a PEFT method's trainable parameters split into the bits of a MemControl mask.

Block units come from the denoiser's family (:func:`block_layout` asks :meth:`memaudit.families.Family.blocks` and
:meth:`memaudit.families.Family.transformer_blocks`; the family is found from the denoiser's class):

- ``granularity="block"`` on a UNet: one unit per transformer block (each ``Transformer2DModel``:
  ``down_blocks.i.attentions.j``, ``mid_block.attentions.0``, ``up_blocks.i.attentions.j``), as in the reference
  implementation, plus what the reference leaves out so that every trainable parameter has a bit: one
  ``<block>.rest`` unit per top-level block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``: its resnets, down-
  and upsamplers) and one ``stem`` unit for the parameters outside those blocks (``conv_in``, ``time_embedding``,
  ``conv_norm_out``, ``conv_out``). Order: ``stem``, then the down blocks, the mid block and the up blocks in the
  order data flows through them, each block's transformers before its ``.rest``.
- ``granularity="block"`` on a DiT: one unit per transformer block -- the family's blocks, in forward order (SD3 and
  PixArt: ``transformer_blocks.i``; Flux: ``transformer_blocks.i``, then ``single_transformer_blocks.i``) -- plus one
  ``stem`` unit, first, for everything else (patch/position embedding, time and text embedders, context embedder,
  ``norm_out``, ``proj_out``, PixArt's ``adaln_single``, ``caption_projection`` and top-level
  ``scale_shift_table``).
- ``granularity="layer"``: one unit per layer (a module owning parameters directly; for LoRA, the adapted layer)
  that holds trainable parameters, grouped in the block order above and in module order within a block. A parameter
  owned by the denoiser itself (PixArt's ``scale_shift_table``) is a unit of its own, named after it.

Units without trainable parameters are omitted.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import torch

from memaudit.core.errors import ConfigError
from memaudit.families import FAMILIES, family_for_denoiser

__all__ = ["GRANULARITIES", "REST", "STEM", "BlockLayout", "Unit", "block_layout", "units_command"]

GRANULARITIES = ("block", "layer")
STEM = "stem"
REST = "rest"


@dataclass
class Unit:
    """One bit of a mask: a named group of a method's trainable parameters."""

    name: str
    param_names: list[str]
    count: int


def units_command(method: str, granularity: str, base: str | None = None) -> str:
    """The command that lists ``method``'s mask units on ``base`` (``BASE`` when it is not known), in mask order."""
    where = shlex.quote(str(base)) if base else "BASE"
    return f"memaudit mitigate units {where} --method {method} --granularity {granularity}"


@dataclass(frozen=True)
class BlockLayout:
    """A denoiser's block units, as its family lays them out."""

    #: the transformer blocks (qualified module names), in the family's order: one unit each
    transformers: tuple[str, ...]
    #: the blocks that hold transformer blocks (a UNet's top-level blocks): their other parameters are one
    #: ``<block>.rest`` unit each
    containers: tuple[str, ...]
    #: every possible block unit name, in mask order (before omitting empty units)
    names: tuple[str, ...]

    def block_of(self, param_name: str) -> str:
        """The block unit of the parameter ``param_name``."""
        for t in self.transformers:
            if param_name.startswith(t + "."):
                return t
        for top in self.containers:
            if param_name.startswith(top + "."):
                return f"{top}.{REST}"
        return STEM

    def in_transformer(self, module_name: str) -> bool:
        """Whether the module ``module_name`` lies inside a transformer block."""
        return any(module_name.startswith(t + ".") for t in self.transformers)


def block_layout(denoiser: torch.nn.Module) -> BlockLayout:
    """The block units of ``denoiser``, from its family (see the module docstring): ``stem``, then each of the
    family's blocks in order -- a transformer block is a unit itself; a block holding transformer blocks gives one
    unit per transformer block inside it and its ``.rest``. ConfigError for a denoiser of no family."""
    family = family_for_denoiser(denoiser)
    if family is None:
        known = dict.fromkeys(c for f in FAMILIES.values() for c in f.components.get(f.denoiser_name, ()))
        raise ConfigError(f"the PEFT methods know the blocks of the denoisers of memaudit's families "
                          f"({', '.join(known)}); a {type(denoiser).__name__} is none of them.")
    transformers = family.transformer_blocks(denoiser)
    inside = set(transformers)
    names, containers = [STEM], []
    for block in family.blocks(denoiser):
        if block in inside:
            names.append(block)
            continue
        containers.append(block)
        names += [t for t in transformers if t.startswith(block + ".")]
        names.append(f"{block}.{REST}")
    return BlockLayout(tuple(transformers), tuple(containers), tuple(names))
