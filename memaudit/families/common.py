"""What several families share beyond :mod:`memaudit.families.base`: the UNet families' (SD, SDXL) denoiser calls
and block layout, and the transformer families' (SD3, Flux) denoiser calls and scheduler check.

A family file imports these from here, never from another family's file.
"""

from __future__ import annotations

import torch

__all__ = ["flow_scheduler_problem", "transformer_call_parts", "unet_blocks", "unet_call_parts",
           "unet_transformer_blocks"]


# -- UNet families (SD 1.x/2.x, SDXL) -----------------------------------------------------------------------------
def unet_call_parts(args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent input, timestep and output of a ``UNet2DConditionModel`` call as diffusers' pipelines make it."""
    x = args[0] if args else kwargs["sample"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    out = output[0] if isinstance(output, tuple) else output.sample
    return x, torch.as_tensor(t, device=x.device).reshape(-1), out


def unet_blocks(unet: torch.nn.Module) -> list[str]:
    """A UNet's transformer-bearing blocks in forward order: each down block, the mid block, each up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def unet_transformer_blocks(unet: torch.nn.Module) -> list[str]:
    """Qualified names of a UNet's transformer blocks (its ``Transformer2DModel`` modules), in module order:
    ``down_blocks.i.attentions.j``, ``mid_block.attentions.0``, ``up_blocks.i.attentions.j``."""
    from diffusers import Transformer2DModel  # diffusers: a measured import cost, paid when blocks are asked for

    return [name for name, m in unet.named_modules() if name and isinstance(m, Transformer2DModel)]


# -- transformer families (SD3, Flux) -----------------------------------------------------------------------------
def transformer_call_parts(kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latent input, timestep and output of a transformer call made with keywords (``hidden_states``,
    ``timestep``) and ``return_dict=False``, as the SD3 and Flux pipelines make it."""
    x = kwargs["hidden_states"]
    out = output[0] if isinstance(output, tuple) else output.sample
    return x, torch.as_tensor(kwargs["timestep"], device=x.device).reshape(-1), out


def flow_scheduler_problem(pipe) -> str | None:
    """Why ``pipe.scheduler`` cannot drive a rectified-flow family (None when it can)."""
    name = type(pipe.scheduler).__name__
    if not name.startswith("FlowMatch"):
        return (f"its scheduler is a {name}; a rectified-flow model needs its FlowMatchEulerDiscreteScheduler "
                "(sigma-valued timesteps).")
    return None
