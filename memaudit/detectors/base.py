"""What a memorization detector is: a :class:`Detector` reads the sampling pass through :class:`StepView` (the
conditional and unconditional predictions the denoiser makes at each step anyway) and, when it needs more,
:class:`Probe` (extra denoiser calls at the first step's input, made before the pass), and returns one score per
image, higher meaning more likely memorized.

A detector class carries its description (:attr:`Detector.name`, :attr:`Detector.summary`, :attr:`Detector.source`)
and its cost (:attr:`Detector.extra_calls`: denoiser evaluations per image beyond the sampling pass); an instance
holds the state of one batch of images and is made fresh for every batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from memaudit.families.base import Conditioning, Family
from memaudit.families.pipeline import StepView

__all__ = ["Detector", "Probe", "StepView"]


@dataclass
class Probe:
    """Extra denoiser calls at the first step's input ``x`` (unpacked ``[B, C, H, W]``, pure noise as the pipeline
    feeds it to the denoiser at the first step), made before the sampling pass.

    ``score(x, t, cond)`` is the prediction in the family's score space (float32) for latents ``x`` at timesteps
    ``t`` (scheduler units, ``[B]`` or one) under the conditioning ``cond`` (:attr:`cond` or :attr:`uncond`),
    differentiable in ``x`` when gradients or forward-mode AD are on."""

    x: torch.Tensor
    t: torch.Tensor  # the first step's timestep, scheduler units
    schedule: torch.Tensor  # the pass's timesteps, first to last
    cond: Conditioning
    uncond: Conditioning
    score: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    family: Family
    pipe: object

    def pair(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional predictions at ``x``, ``t``: one call on the doubled batch (``[uncond;
        cond]``, as classifier-free guidance batches them), 2 evaluations per image."""
        n = len(x)
        out = self.score(torch.cat([x, x]), t, Conditioning.cat([self.uncond, self.cond]))
        return out[n:], out[:n]

    def sigma(self, t: torch.Tensor) -> float:
        """The noise level ``sqrt(1 - alpha_bar_t)`` of a DDPM family at ``t`` (1 for a flow family, whose score
        space is the velocity and carries no such factor)."""
        if getattr(self.family, "flow", False):
            return 1.0
        alpha_bar = self.family.alpha_bar(self.pipe, torch.as_tensor(t).reshape(1).cpu())
        return float((1 - alpha_bar).sqrt().reshape(-1)[0])


class Detector(ABC):
    """One memorization detector; subclasses set the class attributes and override what they read.

    The sampler calls :meth:`start` once per batch when :attr:`extra_calls` > 0 (before the pass), :meth:`step` at
    every step where the predictions are read (every step under classifier-free guidance; the scored steps of a
    model without an unconditional prediction), and :meth:`scores` after the pass. Scores are oriented so that
    higher means more likely memorized, whatever the paper's own sign (the subclass flips it and says so)."""

    #: the name ``--detectors`` takes and results use
    name: ClassVar[str] = ""
    #: one line: what it measures
    summary: ClassVar[str] = ""
    #: the paper, the equation it implements and how it differs from the paper's code, if it must
    source: ClassVar[str] = ""
    #: denoiser evaluations per image beyond the sampling pass (a forward-mode product counts as the evaluations it
    #: differentiates through)
    extra_calls: ClassVar[int] = 0
    #: the families it reads (None: every family whose denoiser memaudit reads)
    families: ClassVar[tuple[str, ...] | None] = None
    #: the steps whose cross-attention probabilities it reads: "first" and/or "last" (none: it reads no attention)
    attention_steps: ClassVar[tuple[str, ...]] = ()

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        self.n = n  # images in the batch
        #: ``[B]`` each prompt's token count as the first text encoder reads it (start and end tokens included)
        self.tokens = tokens
        #: :meth:`attention_layers` of this denoiser
        self.layers = list(layers)

    def attention(self, view: StepView) -> dict[str, torch.Tensor]:
        """This detector's layers' attention probabilities at ``view``'s step (empty where none were read)."""
        return {name: view.attention[name] for name in self.layers if name in view.attention}

    @classmethod
    def attention_layers(cls, family: Family, denoiser: torch.nn.Module) -> list[str]:
        """The cross-attention modules whose probabilities it reads (:attr:`attention_steps`), by name."""
        return []

    def nan(self) -> torch.Tensor:
        """``[B]`` NaN: no score."""
        return torch.full((self.n,), float("nan"))

    def start(self, probe: Probe) -> None:
        """Extra calls before the pass (only when :attr:`extra_calls` > 0); by default none."""
        return None

    def step(self, view: StepView) -> None:
        """Read one step of the pass; by default nothing."""
        return None

    @abstractmethod
    def scores(self) -> torch.Tensor:
        """``[B]`` float32 scores of the batch's images (NaN where the image has none)."""

    @classmethod
    def free(cls) -> bool:
        """Whether it costs nothing beyond the sampling pass (free detectors run by default)."""
        return cls.extra_calls == 0
