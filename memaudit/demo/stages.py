"""What the bundled settings' builds share: the models' sizes and the training log line."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger("memaudit.demo.build")


def model_spec() -> dict:
    """The size of every bundled model (a :class:`~memaudit.models.ModelSpec`'s fields): 32x32 grayscale images,
    8x8x4 latents, a two-level UNet of about 4M parameters and a two-layer CLIP text encoder."""
    return dict(image_channels=1, resolution=32, vae_channels=(32, 64, 64), vae_norm_groups=32, latent_channels=4,
                unet_channels=(64, 128), unet_layers_per_block=1, unet_norm_groups=32, attention_head_dim=8,
                cross_attention_dim=64, text_hidden=64, text_layers=2, text_heads=4, text_intermediate=256,
                max_length=77, prediction_type="epsilon", scheduler="ddim")


class TrainLog:
    """A training run's progress in the build log: the running loss every ``every`` steps."""

    def __init__(self, name: str, every: int = 100):
        self.name, self.every, self.t0 = name, every, time.perf_counter()

    def __call__(self, step: int, total: int, logs: dict) -> None:
        if step % self.every == 0 or step == total:
            logger.info("%s %d/%d loss %.4f (%.0f s)", self.name, step, total, logs.get("running_loss", logs["loss"]),
                        time.perf_counter() - self.t0)
