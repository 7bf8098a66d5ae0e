"""Asthana & Belagiannis, ICLR 2026, "Detecting and Mitigating Memorization in Diffusion Models through Anisotropy
of the Log-Probability" (code: ``rohanasthana/memorization-anisotropy``, ``local_model/pipe.py``, mode ``x,c|x``):
``S = gamma_1 * N + gamma_2 * A`` on the pure-noise latent ``x_T``, where

* ``N = ||eps_c(x_T, t_1) - eps_u(x_T, t_1)||_2`` at the first sampling step ``t_1`` (Wen et al.'s first-step
  magnitude, the isotropic part), and
* ``A = mean over positions (h, w) of cos(eps_u(x_T, t_lo)[:, h, w], (eps_c - eps_u)(x_T, t_lo)[:, h, w])``, the
  cosine over the latent channels at each position between the unconditional prediction and the guidance direction
  (the anisotropic part), at the *low-noise* label ``t_lo`` = the schedule's third timestep from the end (41 of
  DDIM-50 in the paper) but fed the same pure-noise input ``x_T``.

Memorized prompts align the guidance direction with the unconditional score: higher ``S`` is more memorized, as in
the paper. ``gamma_1 = 1, gamma_2 = 2`` are the paper's SD v1.4 weights; ``N``'s scale depends on the model (its
latent size and prediction type: the paper uses ``gamma_2 = 0.1`` on SD v2), so on another model the weights are a
choice the detection table measures, not a tuned constant. Cost: ``A`` takes one extra classifier-free-guidance call
(2 denoiser evaluations per image); ``N`` is read from the sampling pass.

Differences from the paper's code: the prediction is the family's score space (eps; a flow model's velocity, where
``N`` is :mod:`~memaudit.detectors.wen`'s first-step magnitude too); the input at ``t_lo`` is the first step's
denoiser input unchanged (the paper rescales it with ``scale_model_input`` at ``t_lo``, the identity for its DDIM);
a schedule of fewer than 3 steps takes its last timestep.

``anisotropy_first`` is a free variant measured beside it (not in the paper): ``A`` at the first step, from the
predictions the pass makes there anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memaudit.detectors.base import Detector, Probe, StepView

__all__ = ["Anisotropy", "AnisotropyFirst", "alignment", "GAMMA_NORM", "GAMMA_ALIGNMENT"]

#: the paper's SD v1.4 weights
GAMMA_NORM, GAMMA_ALIGNMENT = 1.0, 2.0


def alignment(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean over latent positions of the cosine, over channels, between ``uncond`` and ``cond -
    uncond`` (``[B, C, H, W]``)."""
    return F.cosine_similarity(uncond.float(), (cond - uncond).float(), dim=1).flatten(1).mean(1)


class Anisotropy(Detector):
    name = "anisotropy"
    summary = "N + 2A: first-step magnitude plus the guidance/uncond channel alignment at a low-noise label on x_T"
    source = ("Asthana & Belagiannis, ICLR 2026, S = gamma_1 N + gamma_2 A (mode x,c|x), gamma = (1, 2) as for "
              "SD v1.4")
    extra_calls = 2

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.norm, self.align = self.nan(), self.nan()

    def start(self, probe: Probe) -> None:
        t_lo = probe.schedule[-3] if len(probe.schedule) >= 3 else probe.schedule[-1]
        cond, uncond = probe.pair(probe.x, t_lo)
        self.align = alignment(cond, uncond)

    def step(self, view: StepView) -> None:
        if view.step == 0:
            self.norm = view.norm

    def scores(self) -> torch.Tensor:
        return GAMMA_NORM * self.norm.float().cpu() + GAMMA_ALIGNMENT * self.align.float().cpu()


class AnisotropyFirst(Detector):
    name = "anisotropy_first"
    summary = "N + 2A with the alignment A at the first step itself: free (a variant, not in the paper)"
    source = ("Asthana & Belagiannis, ICLR 2026, S = gamma_1 N + gamma_2 A with A read at the first step's label "
              "instead of a low-noise one (no extra call)")

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.score = self.nan()

    def step(self, view: StepView) -> None:
        if view.step == 0:
            self.score = GAMMA_NORM * view.norm + GAMMA_ALIGNMENT * alignment(view.cond, view.uncond)

    def scores(self) -> torch.Tensor:
        return self.score.float().cpu()
