"""Attention tuning: the parameters of the attention modules of the denoiser's transformer blocks.

MemControl (Dutt et al.) compares it with SV-DIFF and DiffFit; its reference masks one bit per transformer block
(16 on Stable Diffusion 1.5).
"""

from __future__ import annotations

from memaudit.peft.base import PEFTMethod
from memaudit.peft.layers import is_attention


class AttentionTuning(PEFTMethod):
    """Every parameter inside the diffusers attention modules of the transformer blocks: ``Attention`` (a UNet's and
    PixArt's self- and cross-attention, SD3's joint attention) and ``FluxAttention``, i.e. ``to_q``, ``to_k``,
    ``to_v``, ``to_out`` and, where they exist, the context stream's ``add_q_proj``, ``add_k_proj``, ``add_v_proj``,
    ``to_add_out`` and the query/key norms. Flux's single-stream blocks have an attention without an output projection
    (their ``proj_out`` mixes attention and MLP and is not attention: it stays frozen). Learning rate 1e-4 (our choice:
    these are full weight matrices, as in full fine-tuning)."""

    name = "attention"
    default_lr = 1e-4
    description = "the attention modules (to_q, to_k, to_v, to_out, ...) of the transformer blocks"

    def _trainable_names(self) -> list[str]:
        roots = [n for n, m in self.denoiser.named_modules() if is_attention(m) and self._in_transformer(n)]
        names = [f"{r}.{p}" for r in roots for p, _ in self.denoiser.get_submodule(r).named_parameters()]
        return list(dict.fromkeys(names))  # an attention module nested in another is counted once
