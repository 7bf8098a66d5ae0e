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

__all__ = ["PipelineRun", "StepView", "cross_attention_probs", "sample"]


@dataclass
class StepView:
    """One sampling step as the detectors see it: predictions of every image of the batch in the family's score
    space (:meth:`~memaudit.families.base.Family.score_output`: eps, or a flow model's velocity), float32,
    unpacked ``[B, C, H, W]``."""

    step: int  # 0 = the first sampling step
    steps: int  # how many steps the pass makes
    t: torch.Tensor  # [B] scheduler units
    cond: torch.Tensor  # prediction for the prompt
    uncond: torch.Tensor  # prediction for the empty prompt
    delta: torch.Tensor  # the guidance direction cond - uncond (not scaled by the guidance weight)
    norm: torch.Tensor  # [B] ||delta|| over the whole latent: the step's guidance norm, as the recorder keeps it
    #: cross-attention layer name -> ``[B, queries, text tokens]`` attention probabilities of the conditional branch,
    #: averaged over heads: the layers asked for, at the steps asked for (else empty)
    attention: dict = field(default_factory=dict)


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
    #: each detector's ``[B]`` scores (:mod:`memaudit.detectors`), by name
    detectors: dict = field(default_factory=dict)


def cross_attention_probs(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          attention_mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """``[n, queries, keys]``: the attention probabilities of the last ``n`` images of the batch (the conditional
    half under classifier-free guidance), averaged over heads, computed as diffusers' ``AttnProcessor`` computes them
    (``Attention.get_attention_scores``: the same projections, mask and scale)."""
    h = hidden_states
    if h.ndim == 4:
        b, c, height, width = h.shape
        h = h.view(b, c, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    e = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    b = h.shape[0]
    mask = attn.prepare_attention_mask(attention_mask, e.shape[1], b)
    probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(h)), attn.head_to_batch_dim(attn.to_k(e)), mask)
    return probs.view(b, attn.heads, probs.shape[1], probs.shape[2])[-n:].mean(1).float()


class _AttentionTap:
    """In place of a cross-attention module's processor: the module's own processor computes the output as before;
    at the steps the recorder wants, the attention probabilities are computed beside it (:func:`cross_attention_probs`)
    and kept for the step's :class:`StepView`."""

    def __init__(self, recorder: _Recorder, name: str, original):
        self.recorder, self.name, self.original = recorder, name, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        rec = self.recorder
        if not rec.busy and encoder_hidden_states is not None and rec.attention[self.name](len(rec.norms)):
            rec.maps[self.name] = cross_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                        rec.n)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class _Recorder:
    """The forward hook on the denoiser: per call, the guidance norm of each image. With ``check_finite`` the
    first call's output is checked once (one device sync) and a non-finite one stops sampling at once."""

    def __init__(self, family: Family, pipe, n: int, uncond: Conditioning, score_steps: Callable[[int], bool],
                 check_finite: bool = False, model: str = "the model", detectors: Sequence = (), steps: int = 0,
                 resolution: int = 0):
        self.family, self.pipe, self.n, self.uncond, self.score_steps = family, pipe, n, uncond, score_steps
        self.check_finite, self.model = check_finite, model
        self.detectors, self.steps, self.resolution = list(detectors), steps, resolution
        self.attention: dict[str, Callable[[int], bool]] = {}  # layer -> the steps it is read at
        self.maps: dict[str, torch.Tensor] = {}  # this step's attention probabilities, by layer
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
            self._record(step, t, eps[n:], eps[:n])
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
            self._record(step, t, eps_c, eps_u)
        else:
            self.norms.append(torch.full((n,), float("nan"), device=x.device))
        return None

    def _record(self, step: int, t: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor) -> None:
        """Keep this step's guidance norm and show the chosen detectors its predictions (the difference and its norm
        computed once for all; the detectors' own denoiser calls are not recorded)."""
        delta = eps_c - eps_u
        norm = delta.flatten(1).norm(dim=1).float()
        self.norms.append(norm)
        if not self.detectors:
            return
        unpack = self.family.unpacked
        t = t.expand(self.n) if t.numel() == 1 else t[-self.n:]  # [uncond; cond] timesteps are equal
        view = StepView(step=step, steps=self.steps, t=t, attention=self.maps, norm=norm,
                        cond=unpack(self.pipe, eps_c, self.resolution), uncond=unpack(self.pipe, eps_u, self.resolution),
                        delta=unpack(self.pipe, delta, self.resolution))
        self.maps = {}
        self.busy = True
        try:
            for detector in self.detectors:
                detector.step(view)
        finally:
            self.busy = False


@torch.no_grad()
def sample(family: Family, pipe, cond: Conditioning, uncond: Conditioning, seeds: Sequence[int], *, steps: int,
           guidance: float, resolution: int, latents: torch.Tensor | None = None,
           score_steps: Callable[[int], bool] = lambda i: i == 0, check_finite: bool = False,
           model: str = "the model", detectors: Sequence = (),
           attention: dict[str, Callable[[int], bool]] | None = None) -> PipelineRun:
    """One batch through the family's diffusers pipeline: images of ``cond`` (batch ``B``) from the seeds' initial
    latents (``latents``, else :meth:`Family.initial_latents`), and per step the guidance norm of every image.

    ``uncond`` is the unconditional conditioning, batch ``B``. Where the pipeline's denoiser call has no
    unconditional half, the norm is computed by one extra call at the steps where ``score_steps(i)`` is true and is
    NaN elsewhere. With ``check_finite`` the denoiser's first prediction is checked (one device sync): NaN or inf
    there raises :func:`nonfinite_prediction_error` naming ``model`` at once, before the other steps run.
    ``detectors`` (:class:`~memaudit.detectors.base.Detector` instances for this batch, already started) read every
    step whose predictions are read; their scores come back in :attr:`PipelineRun.detectors`. ``attention`` maps
    cross-attention modules of the denoiser to the steps ``i`` at which the detectors read their probabilities
    (:attr:`StepView.attention`); their processors are wrapped for this call only."""
    n = len(cond)
    denoiser = family.denoiser(pipe)
    if latents is None:
        latents = family.initial_latents(pipe, seeds, resolution)
    device = denoiser.device
    recorder = _Recorder(family, pipe, n, uncond.to(device), score_steps, check_finite=check_finite, model=model,
                         detectors=detectors, steps=steps, resolution=resolution)
    recorder.attention = dict(attention or {})
    taps = {name: denoiser.get_submodule(name) for name in recorder.attention}
    originals = {name: module.processor for name, module in taps.items()}
    for name, module in taps.items():
        module.processor = _AttentionTap(recorder, name, originals[name])
    handle = denoiser.register_forward_hook(recorder, with_kwargs=True)
    try:
        out = pipe(**family.pipeline_kwargs(cond.to(device), uncond.to(device)), num_inference_steps=steps,
                   guidance_scale=guidance, height=resolution, width=resolution, latents=latents.to(device),
                   generator=[torch.Generator().manual_seed(int(s)) for s in seeds], output_type="pt",
                   return_dict=False)
    finally:
        handle.remove()
        for name, module in taps.items():
            module.processor = originals[name]
    images = out[0] if isinstance(out, (tuple, list)) else out
    norms = torch.stack(recorder.norms, dim=1).cpu() if recorder.norms else torch.empty(n, 0)
    timesteps = torch.stack(recorder.timesteps) if recorder.timesteps else torch.empty(0)
    return PipelineRun(images=images.float().cpu(), norms=norms, timesteps=timesteps, extra_calls=recorder.extra_calls,
                       detectors={d.name: d.scores() for d in detectors})
