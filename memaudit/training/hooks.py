"""The hook protocol of :func:`~memaudit.training.loop.train_denoiser`: what a hook sees (:class:`Batch`,
:class:`LossContext`, :class:`TrainState`) and when it is called (:class:`TrainHook`).

Later features plug in here: random word addition edits the captions (:mod:`memaudit.baselines.rwa`), threshold
mitigation weights the per-sample loss (:mod:`memaudit.baselines.threshold`), parameter masks edit the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memaudit.families import Conditioning
from memaudit.training.config import TrainConfig

__all__ = ["Batch", "LossContext", "TrainHook", "TrainState"]


@dataclass
class Batch:
    """One micro-batch as hooks see it: dataset indices, clean scaled latents and captions."""

    indices: torch.Tensor
    latents: torch.Tensor
    captions: list[str]


@dataclass
class LossContext:
    """Everything about a micro-batch's forward pass, for hooks that weight samples (threshold mitigation)."""

    batch: Batch
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor
    embeddings: Conditioning
    output: torch.Tensor
    per_sample_loss: torch.Tensor


@dataclass
class TrainState:
    """The mutable state of a run; hooks may read it (and keep their own counters in ``stats``)."""

    target: object
    config: TrainConfig
    params: list
    generator: torch.Generator
    step: int = 0
    skipped_steps: int = 0
    stats: dict = field(default_factory=dict)


class TrainHook:
    """Extension point of :func:`~memaudit.training.loop.train_denoiser`; override what you need. Hooks run in the
    order given."""

    name = "hook"

    def on_start(self, state: TrainState) -> None:
        """Once, before the first step (after a resume, too)."""

    def on_batch(self, batch: Batch, state: TrainState) -> Batch:
        """Edit a micro-batch before the forward pass (e.g. captions); draw randomness from ``state.generator``."""
        return batch

    def sample_weights(self, ctx: LossContext, state: TrainState) -> torch.Tensor | None:
        """Per-sample loss weights (``None``: all ones). A sample of weight 0 does not train."""
        return None

    def on_gradients(self, state: TrainState) -> None:
        """After backward and before clipping and the optimizer step (e.g. mask gradients)."""

    def on_step_end(self, state: TrainState, logs: dict) -> None:
        """After each optimizer step; ``logs`` holds the step's loss."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
