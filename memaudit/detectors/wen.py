"""Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models": the magnitude of
the text-conditional noise prediction, ``d = ||eps(x_t, prompt) - eps(x_t, empty)||_2`` over the whole latent, not
scaled by the guidance weight (their ``local_sd_pipeline.py``, ``noise_pred_text - noise_pred_uncond``, ``lp = 2``),
averaged over generations and over steps (``examples/det_mem_viz.ipynb``). Free: classifier-free guidance makes both
predictions at every step.

Two windows, as their Table 1 reports: the first step (pure noise; it detects before any denoising) and every step.
Flow-matching families measure it on the velocity (in eps space it is identically 0 at the first step; see
:class:`~memaudit.families.base.FlowMatchingFamily`). A model without an unconditional prediction (Flux dev) has the
predictions only at the audit's scored steps (``--denoising-window``, by default the first): there ``wen_all`` is
the mean over those steps, and NaN for steps never scored is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memaudit.detectors.base import Detector, StepView

__all__ = ["WenAll", "WenFirst"]


class WenFirst(Detector):
    name = "wen_first"
    summary = "||eps_c - eps_u|| at the first step (pure noise)"
    source = "Wen et al., ICLR 2024, the text-conditional noise magnitude, first step (their Table 1, 1 step)"

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.norms = self.nan()

    def step(self, view: StepView) -> None:
        if view.step == 0:
            self.norms = view.norm

    def scores(self) -> torch.Tensor:
        return self.norms.cpu()


class WenAll(Detector):
    name = "wen_all"
    summary = "||eps_c - eps_u|| averaged over every sampling step"
    source = "Wen et al., ICLR 2024, the text-conditional noise magnitude, mean over all steps (their Table 1)"

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.total: torch.Tensor | None = None  # on the denoiser's device: no sync per step
        self.count = 0

    def step(self, view: StepView) -> None:
        norms = view.norm.double()
        self.total = norms if self.total is None else self.total + norms
        self.count += 1

    def scores(self) -> torch.Tensor:
        return (self.total / self.count).float().cpu() if self.count else self.nan()
