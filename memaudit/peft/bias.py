"""Bias tuning (BitFit, Ben Zaken et al., ACL 2022, applied to the denoiser): only the biases train."""

from __future__ import annotations

from memaudit.peft.base import PEFTMethod


class BiasTuning(PEFTMethod):
    """Every bias of the denoiser (convolutions, linear layers, norms). Learning rate 1e-3 (our choice: bias-only
    tuning needs a larger rate than full fine-tuning to move)."""

    name = "bias"
    default_lr = 1e-3
    description = "every bias of the denoiser"

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in self.denoiser.named_parameters() if n.rpartition(".")[2] == "bias"]
