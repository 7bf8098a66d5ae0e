"""Norm tuning: only the affine parameters of the normalization layers train."""

from __future__ import annotations

from memaudit.mitigate.methods.base import NORM_TYPES, PEFTMethod


class NormTuning(PEFTMethod):
    """Weight and bias of every ``GroupNorm`` and ``LayerNorm`` of the UNet. Learning rate 1e-3 (our choice)."""

    name = "norm"
    default_lr = 1e-3
    description = "weight and bias of every GroupNorm and LayerNorm"

    def _trainable_names(self) -> list[str]:
        return self._names_where(lambda _, m: isinstance(m, NORM_TYPES))
