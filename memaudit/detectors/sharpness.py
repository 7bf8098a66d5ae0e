"""Jeon, Kim & No, ICML 2025, "Understanding and Mitigating Memorization in Generative Models via Sharpness of
Probability Landscapes" (code: ``Dongjae0324/sharpness_memorization_diffusion``, ``local_model/pipe.py``): the
sharpness of the log-density at the initial step, ``||H_c s_delta - H_u s_delta||_2`` over the whole latent, where
``s = -eps / sigma_t`` is the score, ``s_delta = s_c - s_u`` and ``H = d s / d x`` its Hessian of ``log p``, at the
first step's pure-noise input ``x_T``: the paper's "Hessian x score" with ``steps = 1`` (their Table 1). Higher is
sharper, more memorized, as in the paper.

As in their code, the Hessian-vector products are exact, by forward-mode differentiation (``torch.func.jvp``) of the
conditional and unconditional predictions on one doubled batch along ``s_delta``; with ``eps`` predictions
``H s_delta = J s_delta' / sigma_t^2`` where ``J = d eps / d x`` and ``s_delta' = eps_c - eps_u``, which is what is
computed. Fused attention kernels have no forward-mode derivative, so the product runs with PyTorch's math attention
(the paper's code also turns flash and memory-efficient attention off).

Cost: one forward-mode product on the doubled batch, counted as 2 denoiser evaluations per image (it costs about
2 to 3 plain evaluations of the same batch); ``eps_c - eps_u`` at ``x_T`` comes from the pass's first step.

Differences from the paper's code: the family's score space (a flow model's velocity ``v``, differentiated with no
``sigma`` factor: ``||(J_c - J_u)(v_c - v_u)||``; the paper has no flow model); the derivative is taken with respect
to the denoiser's input (for schedulers that scale the input, such as Euler's, this differs from the derivative with
respect to ``x_T`` by a constant factor at the first step, the same for every prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from memaudit.detectors.base import Detector, Probe, StepView
from memaudit.families.base import Conditioning

__all__ = ["Sharpness", "sharpness"]


def sharpness(probe: Probe, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``||(J_c - J_u)(cond - uncond)|| / sigma_t^2`` at the probe's input, where ``cond``/``uncond`` are
    the predictions there and ``J`` the derivative of the prediction with respect to the input."""
    n = len(probe.x)
    both = Conditioning.cat([probe.uncond, probe.cond])
    t = torch.as_tensor(probe.t).reshape(-1)
    t = torch.cat([t.expand(n), t.expand(n)]) if t.numel() == 1 else torch.cat([t, t])
    delta = (cond - uncond).float()
    x = probe.x.float()

    def predict(z: torch.Tensor) -> torch.Tensor:
        return probe.score(z, t, both)

    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = jvp(predict, (torch.cat([x, x]),), (torch.cat([delta, delta]),))
    product = (tangent[n:] - tangent[:n]).flatten(1).norm(dim=1)
    return product / probe.sigma(t[0]) ** 2


class Sharpness(Detector):
    name = "sharpness"
    summary = "||H_c s_d - H_u s_d|| at x_T: the log-density's sharpness along the guidance direction (one JVP)"
    source = "Jeon, Kim & No, ICML 2025, Hessian x score at the initial step (steps = 1)"
    extra_calls = 2

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.probe: Probe | None = None
        self.score: torch.Tensor | None = None

    def start(self, probe: Probe) -> None:
        self.probe = probe

    def step(self, view: StepView) -> None:
        if view.step == 0 and self.probe is not None:
            self.score = sharpness(self.probe, view.cond, view.uncond)

    def scores(self) -> torch.Tensor:
        if self.score is None and self.probe is not None:  # the pass did not read the first step (Flux dev's window)
            cond, uncond = self.probe.pair(self.probe.x, self.probe.t)
            self.score = sharpness(self.probe, cond, uncond)
        return self.nan() if self.score is None else self.score.float().cpu()
