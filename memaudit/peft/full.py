"""Full fine-tuning: every denoiser parameter trains (the memorizing baseline of MemControl's comparisons)."""

from __future__ import annotations

from memaudit.peft.base import PEFTMethod


class FullFineTuning(PEFTMethod):
    """Every parameter of the denoiser (UNet or transformer); the text encoder(s) and the VAE stay frozen. Learning
    rate 1e-4 (our choice, the usual Stable Diffusion fine-tuning rate)."""

    name = "full"
    default_lr = 1e-4
    description = "every denoiser parameter"

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in self.denoiser.named_parameters()]
