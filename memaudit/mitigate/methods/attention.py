"""Attention tuning: the parameters of the attention modules of the UNet's transformer blocks.

MemControl (Dutt et al.) compares it with SV-DIFF and DiffFit; its reference masks one bit per transformer block
(16 on Stable Diffusion 1.5).
"""

from __future__ import annotations

from memaudit.mitigate.methods.base import PEFTMethod


class AttentionTuning(PEFTMethod):
    """Every parameter inside the diffusers ``Attention`` modules (self- and cross-attention: ``to_q``, ``to_k``,
    ``to_v``, ``to_out`` and their norms, if any) of the transformer blocks. Learning rate 1e-4 (our choice: these
    are full weight matrices, as in full fine-tuning)."""

    name = "attention"
    default_lr = 1e-4
    description = "the attention modules (to_q, to_k, to_v, to_out) of the transformer blocks"

    def _trainable_names(self) -> list[str]:
        from diffusers.models.attention_processor import Attention

        roots = [n for n, m in self.unet.named_modules() if isinstance(m, Attention) and self._in_transformer(n)]
        return [f"{r}.{p}" for r in roots for p, _ in self.unet.get_submodule(r).named_parameters()]
