"""Sampling through a family's own diffusers pipeline, with the denoising strength read on the way.

Sampling (:func:`sample`) drives the family's own diffusers pipeline, so images equal plain diffusers' for the same
seeds by construction, and reads the conditional and unconditional predictions with a forward hook on the
denoiser: the denoising strength ``||eps_c - eps_u||`` of Wen et al. comes free with classifier-free guidance.
(Flow-matching families measure it on the velocity: in eps space it is identically zero at the first step; see
:class:`~memaudit.families.base.FlowMatchingFamily`.) When
a call carries no unconditional half (a guidance-distilled model such as Flux dev, or guidance <= 1), the hook makes
one extra denoiser call with the empty prompt at the steps the score needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from memaudit.families.base import Conditioning, Family, nonfinite_prediction_error

__all__ = ["PipelineRun", "sample"]


@dataclass
class PipelineRun:
    """What :func:`sample` returns for one batch."""

    images: torch.Tensor  # [B, C, H, W] in [0, 1], float32, CPU
    norms: torch.Tensor  # [B, steps]: ||eps_c - eps_u||; NaN at steps not scored
    timesteps: torch.Tensor  # [steps], scheduler units
    #: denoiser evaluations made only for the score, one per image and scored step (a batch of B images scored at
    #: one step is one batched call that counts B): what "one extra call per image" costs
    extra_calls: int = 0
    calls: list = field(default_factory=list)


class _Recorder:
    """The forward hook on the denoiser: per call, the guidance norm of each image. With ``check_finite`` the
    first call's output is checked once (one device sync) and a non-finite one stops sampling at once."""

    def __init__(self, family: Family, pipe, n: int, uncond: Conditioning, score_steps: Callable[[int], bool],
                 check_finite: bool = False, model: str = "the model"):
        self.family, self.pipe, self.n, self.uncond, self.score_steps = family, pipe, n, uncond, score_steps
        self.check_finite, self.model = check_finite, model
        self.norms: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.extra_calls = 0
        self.busy = False

    def __call__(self, module, args, kwargs, output):
        if self.busy:  # our own extra call
            return None
        x, t, out = self.family.call_parts(self.pipe, args, kwargs, output)
        step = len(self.norms)
        if self.check_finite and step == 0 and not bool(torch.isfinite(out).all()):
            raise nonfinite_prediction_error(self.model, out.dtype, nan=bool(torch.isnan(out).any()))
        n = self.n
        t = t.reshape(-1)
        self.timesteps.append(t[0].detach().float().cpu())
        if x.shape[0] == 2 * n:
            eps = self.family.score_output(self.pipe, out, x.float(), t.expand(2 * n) if t.numel() == 1 else t)
            self.norms.append((eps[n:] - eps[:n]).flatten(1).norm(dim=1).float())
        elif x.shape[0] == n and self.score_steps(step):
            self.busy = True
            try:
                out_u = self.family.recall(self.pipe, module, args, kwargs, self.uncond)
            finally:
                self.busy = False
            self.extra_calls += n
            tt = t.expand(n) if t.numel() == 1 else t
            eps_c = self.family.score_output(self.pipe, out, x.float(), tt)
            eps_u = self.family.score_output(self.pipe, out_u, x.float(), tt)
            self.norms.append((eps_c - eps_u).flatten(1).norm(dim=1).float())
        else:
            self.norms.append(torch.full((n,), float("nan"), device=x.device))
        return None


@torch.no_grad()
def sample(family: Family, pipe, cond: Conditioning, uncond: Conditioning, seeds: Sequence[int], *, steps: int,
           guidance: float, resolution: int, latents: torch.Tensor | None = None,
           score_steps: Callable[[int], bool] = lambda i: i == 0, check_finite: bool = False,
           model: str = "the model") -> PipelineRun:
    """One batch through the family's diffusers pipeline: images of ``cond`` (batch ``B``) from the seeds' initial
    latents (``latents``, else :meth:`Family.initial_latents`), and per step the guidance norm of every image.

    ``uncond`` is the unconditional conditioning, batch ``B``. Where the pipeline's denoiser call has no
    unconditional half, the norm is computed by one extra call at the steps where ``score_steps(i)`` is true and is
    NaN elsewhere. With ``check_finite`` the denoiser's first prediction is checked (one device sync): NaN or inf
    there raises :func:`nonfinite_prediction_error` naming ``model`` at once, before the other steps run."""
    n = len(cond)
    denoiser = family.denoiser(pipe)
    if latents is None:
        latents = family.initial_latents(pipe, seeds, resolution)
    device = denoiser.device
    recorder = _Recorder(family, pipe, n, uncond.to(device), score_steps, check_finite=check_finite, model=model)
    handle = denoiser.register_forward_hook(recorder, with_kwargs=True)
    try:
        out = pipe(**family.pipeline_kwargs(cond.to(device), uncond.to(device)), num_inference_steps=steps,
                   guidance_scale=guidance, height=resolution, width=resolution, latents=latents.to(device),
                   generator=[torch.Generator().manual_seed(int(s)) for s in seeds], output_type="pt",
                   return_dict=False)
    finally:
        handle.remove()
    images = out[0] if isinstance(out, (tuple, list)) else out
    norms = torch.stack(recorder.norms, dim=1).cpu() if recorder.norms else torch.empty(n, 0)
    timesteps = torch.stack(recorder.timesteps) if recorder.timesteps else torch.empty(0)
    return PipelineRun(images=images.float().cpu(), norms=norms, timesteps=timesteps, extra_calls=recorder.extra_calls)
