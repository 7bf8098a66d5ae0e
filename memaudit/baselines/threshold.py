"""Threshold mitigation (Wen et al., ICLR 2024), training time: do not learn from samples the model already
reproduces.

For every sample of a micro-batch, the training-time denoising strength at the sample's own noise level,
``||eps(x_t, caption) - eps(x_t, empty)||`` (no gradient; one extra UNet call on the empty prompt, the conditional
prediction is the training forward pass itself), is compared with a threshold; samples at or above it get weight
0 and leave the loss. The threshold is fixed, or ``"auto"``: the batch's top decile (samples at or above the 90th
percentile of the batch's strengths). A step whose samples are all dropped is skipped by the training loop.
``state.stats`` counts ``threshold_dropped`` and ``threshold_seen`` samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from memaudit.core.errors import ConfigError
from memaudit.families import Conditioning
from memaudit.training import LossContext, TrainHook, TrainState

StrengthFn = Callable[[LossContext, TrainState], torch.Tensor]


def batch_strength(ctx: LossContext, state: TrainState) -> torch.Tensor:
    """Per-sample ``||eps(x_t, c) - eps(x_t, empty)||`` of a micro-batch, reusing its conditional forward pass."""
    target = state.target
    with torch.no_grad():
        t = ctx.timesteps
        eps_c = target.to_score(ctx.output.detach(), ctx.noisy, t)
        eps_u = target.predict_score(ctx.noisy, t, target.unconditional(len(t)))
    return (eps_c - eps_u).flatten(1).norm(dim=1).float().cpu()


class ThresholdHook(TrainHook):
    """Drop samples whose training-time denoising strength is at or above ``threshold`` (a number or ``"auto"``)."""

    name = "threshold"

    def __init__(self, threshold: float | str = "auto", quantile: float = 0.9, strength: StrengthFn | None = None):
        if isinstance(threshold, str):
            if threshold != "auto":
                raise ConfigError(f"threshold must be a number or 'auto' (got {threshold!r}).")
        elif not threshold > 0:
            raise ConfigError(f"threshold must be positive (got {threshold!r}).")
        if not 0 < quantile < 1:
            raise ConfigError(f"the auto threshold's quantile must be in (0, 1) (got {quantile!r}).")
        self.threshold, self.quantile = threshold, quantile
        self.strength = strength or batch_strength

    def cutoff(self, norms: torch.Tensor) -> float:
        if self.threshold == "auto":
            return float(torch.quantile(norms.double(), self.quantile))
        return float(self.threshold)

    def sample_weights(self, ctx: LossContext, state: TrainState) -> torch.Tensor:
        norms = self.strength(ctx, state).reshape(-1)
        keep = (norms < self.cutoff(norms)).float()
        state.stats["threshold_seen"] = state.stats.get("threshold_seen", 0) + len(keep)
        state.stats["threshold_dropped"] = state.stats.get("threshold_dropped", 0) + int((keep == 0).sum())
        return keep


# -- inference time --------------------------------------------------------------------------------------------
def mitigate_embeddings(target, cond: Conditioning, x: torch.Tensor, t, norm_target: float, lr: float = 0.05,
                        max_steps: int = 10) -> tuple[Conditioning, torch.Tensor, torch.Tensor, int]:
    """Wen et al.'s inference-time mitigation: before sampling, optimize the prompt embeddings
    (``cond.embeds``, ``[B, L, D]``; any pooled embedding or mask stays as it is) with AdamW so that the first step's ``||eps(x_T, cond) - eps(x_T, empty)||`` falls under
    ``norm_target`` for every image.

    The target is per image (the loss is the sum of per-image norms, so one image's gradient does not depend on
    the batch size), and the optimization stops as soon as every image is under it, or after ``max_steps``.
    ``x`` is the batch's initial latents at timestep ``t``. Returns the conditioning with the optimized embeddings
    (detached), the norms before and after, and the number of optimizer steps taken.
    """
    if not norm_target > 0:
        raise ConfigError(f"the mitigation's norm target must be positive (got {norm_target!r}).")
    if max_steps < 0 or not lr > 0:
        raise ConfigError("the mitigation needs lr > 0 and max_steps >= 0.")
    b = len(cond)
    tt = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
    with torch.no_grad():
        eps_u = target.predict_score(x, tt, target.unconditional(b))
    cond = cond.detach()
    emb = cond.embeds.clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr)

    def norms() -> torch.Tensor:
        return (target.predict_score(x, tt, cond.replace(prompt_embeds=emb)) - eps_u).flatten(1).norm(dim=1)

    steps = 0
    with torch.enable_grad():
        current = norms()
        before = current.detach().cpu()
        while steps < max_steps and bool((current >= norm_target).any()):
            opt.zero_grad(set_to_none=True)
            current.sum().backward()
            opt.step()
            steps += 1
            current = norms()
    return cond.replace(prompt_embeds=emb.detach().to(cond.embeds.dtype)), before, current.detach().cpu(), steps


class EmbeddingMitigation:
    """A :class:`~memaudit.sampling.Sampler` ``embedding_hook`` running :func:`mitigate_embeddings` on every batch;
    keeps the before/after norms and the steps taken, for the report."""

    def __init__(self, target, norm_target: float, lr: float = 0.05, max_steps: int = 10):
        if not norm_target > 0:
            raise ConfigError(f"the mitigation's norm target must be positive (got {norm_target!r}).")
        self.target, self.norm_target, self.lr, self.max_steps = target, norm_target, lr, max_steps
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        self.steps: list[int] = []

    def __call__(self, cond: Conditioning, x: torch.Tensor, t) -> Conditioning:
        emb, before, after, steps = mitigate_embeddings(self.target, cond, x, t, self.norm_target, self.lr,
                                                        self.max_steps)
        self.before.append(before)
        self.after.append(after)
        self.steps.append(steps)
        return emb
