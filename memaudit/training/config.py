"""The settings of the training loops: :class:`TrainConfig` (:func:`~memaudit.training.loop.train_denoiser`) and
:class:`VAEConfig` (:func:`~memaudit.training.vae.train_vae`), each field documented by its ``help`` metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from memaudit.core.errors import ConfigError
from memaudit.core.settings import setting

__all__ = ["TrainConfig", "VAEConfig"]



@dataclass
class TrainConfig:
    """Settings of :func:`~memaudit.training.loop.train_denoiser`; each field's ``help`` metadata is its
    documentation."""

    steps: int = setting("optimizer steps", default=1000)
    batch_size: int = setting("images per micro-batch", default=32)
    learning_rate: float = setting("AdamW learning rate (constant)", default=1e-4)
    weight_decay: float = setting("AdamW weight decay", default=1e-2)
    adam_beta1: float = setting("AdamW beta1", default=0.9)
    adam_beta2: float = setting("AdamW beta2", default=0.999)
    adam_epsilon: float = setting("AdamW epsilon", default=1e-8)
    max_grad_norm: float = setting("clip the gradient norm to this (0: no clipping)", default=1.0)
    caption_dropout: float = setting("probability of replacing a caption by the empty prompt (for guidance)", default=0.1)
    gradient_accumulation: int = setting("micro-batches per optimizer step", default=1)
    mixed_precision: str = setting("no, fp16 or bf16 autocast (CUDA only)", default="no")
    seed: int = setting("seed of every random draw of the run", default=0)
    checkpoint_every: int = setting("write a resumable checkpoint every N steps (0: only at the end)", default=0)
    keep_checkpoints: int = setting("how many checkpoints to keep", default=1)
    train_text_encoder: bool = setting("also train the text encoder (building a model from scratch)", default=False)
    log_every: int = setting("report the running loss every N steps", default=50)

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.learning_rate > 0 and math.isfinite(self.learning_rate), "learning_rate must be a positive number"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.caption_dropout < 1, "caption_dropout must be in [0, 1)"),
            (self.gradient_accumulation >= 1, "gradient_accumulation must be at least 1"),
            (self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision must be no, fp16 or bf16"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"training setting invalid: {msg}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VAEConfig:
    """Settings of :func:`~memaudit.training.vae.train_vae`."""

    steps: int = setting("optimizer steps", default=1200)
    batch_size: int = setting("images per batch", default=64)
    learning_rate: float = setting("AdamW learning rate", default=1e-3)
    kl_weight: float = setting("weight of the KL term (Stable Diffusion's VAE uses about 1e-6)", default=1e-6)
    max_grad_norm: float = setting("gradient clipping", default=1.0)
    seed: int = setting("seed", default=0)

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ConfigError("VAE training settings invalid: steps and batch_size must be >= 1, learning_rate > 0.")

    def to_dict(self) -> dict:
        return asdict(self)
