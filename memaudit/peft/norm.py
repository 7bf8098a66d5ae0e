"""Norm tuning: only the affine parameters of the normalization layers train.

On a UNet these are its ``GroupNorm`` and ``LayerNorm`` layers; on Flux the query/key ``RMSNorm`` weights. SD3 (3.0)
and PixArt normalize without affine parameters (their adaptive norms take scale and shift from ``Linear`` layers of
the time embedding, which are not norm parameters), so norm tuning has nothing to train there: no units, and the
mask search refuses it.
"""

from __future__ import annotations

from memaudit.peft.base import PEFTMethod
from memaudit.peft.layers import is_norm


class NormTuning(PEFTMethod):
    """Weight and bias of every ``GroupNorm``, ``LayerNorm`` and ``RMSNorm`` of the denoiser. Learning rate 1e-3
    (our choice)."""

    name = "norm"
    default_lr = 1e-3
    description = "weight and bias of every GroupNorm, LayerNorm and RMSNorm"

    def _trainable_names(self) -> list[str]:
        return self._names_where(lambda _, m: is_norm(m))
