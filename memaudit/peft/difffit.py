"""DiffFit (Xie et al., "DiffFit: Unlocking Transferability of Large Diffusion Models via Simple Parameter-Efficient
Fine-Tuning", ICCV 2023), on a diffusion denoiser (a Stable Diffusion UNet or a DiT).

Trainable: every bias, the affine parameters (weight and bias) of every normalization layer that has them
(``GroupNorm``, ``LayerNorm``, ``RMSNorm``; a DiT's adaptive norms have none: their modulation comes from ``Linear``
layers, whose biases train), and learned scale factors, initialized to 1, on the outputs of the attention and
feed-forward branches of each transformer block. The paper (on DiT) scales each block's branches by a learned factor
gamma; we learn one factor per output channel, ``scale`` of shape ``[dim]``, which contains the single-factor version
as a special case.

Implementation: the branch's output projection is replaced by :class:`ScaledLinear`, which keeps the layer's own
``weight`` and ``bias`` under their original names and multiplies its output by ``scale``. The projections are:

- ``to_out.0`` of every attention module (``attn1``/``attn2`` in a UNet or PixArt, ``attn`` in SD3 and Flux) and, in
  the joint blocks of SD3 and Flux, the context stream's ``to_add_out``;
- the last ``Linear`` of every feed-forward (``ff.net.2``; ``ff_context.net.2`` in the joint blocks);
- in a block whose attention has no output projection of its own (Flux's single-stream blocks, where one
  ``proj_out`` maps the concatenated attention and MLP outputs back to the residual stream), that ``proj_out``.

:meth:`merge` folds the scale into that layer (``W <- diag(s) W``, ``b <- s * b``) and puts the plain ``Linear``
back, so the keys are the original ones. The scales are part of the adapter state: a reloaded adapter keeps them (the
reference code drops them). Learning rate 1e-3 (our choice: small parameter sets need a larger rate than full
fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memaudit.peft.base import PEFTMethod
from memaudit.peft.layers import Wrapper, is_attention, is_norm, replace_module


class ScaledLinear(Wrapper):
    """A ``Linear`` whose output is multiplied channel-wise by the trainable ``scale`` (initialized to 1)."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__(layer)
        self.scale = torch.nn.Parameter(torch.ones(self.weight.shape[0], dtype=self.weight.dtype,
                                                   device=self.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * self.scale.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.weight * self.scale.to(self.weight.dtype)[:, None]

    def merged_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias * self.scale.to(self.bias.dtype)


def _output_projection(attention: torch.nn.Module) -> torch.nn.Module | None:
    to_out = getattr(attention, "to_out", None)
    return to_out[0] if isinstance(to_out, torch.nn.ModuleList) and len(to_out) else None


def scaled_output_layers(denoiser: torch.nn.Module, transformers: list[str]) -> list[str]:
    """Names of the output projections of the attention and feed-forward branches inside the transformer blocks
    ``transformers`` of ``denoiser`` (see the module docstring), in module order."""
    from diffusers.models.attention import FeedForward

    out = []
    inside = tuple(t + "." for t in transformers)
    for name, m in denoiser.named_modules():
        if not name.startswith(inside):
            continue
        if is_attention(m):
            if isinstance(_output_projection(m), torch.nn.Linear):
                out.append(f"{name}.to_out.0")
            if isinstance(getattr(m, "to_add_out", None), torch.nn.Linear):
                out.append(f"{name}.to_add_out")
        elif isinstance(m, FeedForward):
            linears = [i for i, sub in enumerate(m.net) if isinstance(sub, torch.nn.Linear)]
            if linears:
                out.append(f"{name}.net.{linears[-1]}")
    for t in transformers:  # blocks whose attention has no output projection (Flux's single-stream blocks)
        block = denoiser.get_submodule(t)
        bare = [m for m in block.modules() if is_attention(m) and _output_projection(m) is None]
        if bare and isinstance(getattr(block, "proj_out", None), torch.nn.Linear):
            out.append(f"{t}.proj_out")
    return out


class DiffFit(PEFTMethod):
    """DiffFit: biases, norm affines and per-channel output scales; see the module docstring."""

    name = "difffit"
    default_lr = 1e-3
    description = "biases, norm affines and per-channel attention/feed-forward output scales (Xie et al. 2023)"

    def _install(self) -> None:
        for name in scaled_output_layers(self.denoiser, self._transformers):
            replace_module(self.denoiser, name, ScaledLinear(self.denoiser.get_submodule(name)))

    def _trainable_names(self) -> list[str]:
        biases = [n for n, _ in self.denoiser.named_parameters() if n.rpartition(".")[2] == "bias"]
        norms = self._names_where(lambda _, m: is_norm(m))
        scales = [f"{n}.scale" for n, m in self.denoiser.named_modules() if isinstance(m, ScaledLinear)]
        return biases + norms + scales

    def _merge(self) -> None:
        wrapped = [(n, m) for n, m in self.denoiser.named_modules() if isinstance(m, ScaledLinear)]
        for name, m in wrapped:
            replace_module(self.denoiser, name, m.restore())
