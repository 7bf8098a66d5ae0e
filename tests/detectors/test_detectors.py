"""Every detector against an independent computation on tiny pipelines (SD 1.x, SDXL, SD3): plain diffusers runs with
their denoiser calls recorded, then the conditional and unconditional predictions recomputed by separate plain
denoiser calls on each half of the recorded batch, and each paper's formula applied by hand. The Hessian-vector
product of the sharpness detector is checked against a central finite difference of a float64 copy of the
denoiser."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from memaudit.core.errors import ConfigError
from memaudit.detectors import available, default_names, get_detector, resolve_names
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline
from memaudit.tiny_families import call_kwargs, tiny_family

PROMPTS = ["a photo of a face", "a chest x-ray"]
GENERATIONS = 2
STEPS = 4  # the anisotropy's low-noise label (third timestep from the end) is then not the first one
GUIDANCE = 4.0
N = len(PROMPTS) * GENERATIONS


def _halves(value, part: slice):
    """A recorded denoiser argument cut to one half of the doubled batch (dicts and tensors of batch 2N)."""
    if isinstance(value, dict):
        return {k: _halves(v, part) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 2 * N:
        return value[part]
    return value


def _record(pipe, seeds):
    """Plain diffusers with the prompts as strings and one generator per image; every denoiser call's arguments."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    calls = []

    def hook(module, args, kwargs):
        calls.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args),
                      {k: copy.deepcopy(v) for k, v in kwargs.items()}))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=[p for p in PROMPTS for _ in range(GENERATIONS)], num_inference_steps=STEPS,
             generator=[torch.Generator().manual_seed(s) for s in seeds], guidance_scale=GUIDANCE, output_type="pt",
             **call_kwargs(pipe))
    finally:
        handle.remove()
    return denoiser, calls


def _call(denoiser, args, kwargs, part: slice, x=None, t=None):
    """One plain denoiser call on a half of a recorded call (``x``/``t`` replace its latents/timestep)."""
    args, kwargs = [_halves(a, part) for a in args], _halves(kwargs, part)
    if args:  # UNet: sample, timestep positional
        args[0] = args[0] if x is None else x
        args[1] = args[1] if t is None else t
    else:
        kwargs["hidden_states"] = kwargs["hidden_states"] if x is None else x
        kwargs["timestep"] = kwargs["timestep"] if t is None else t
    kwargs["return_dict"] = False
    return denoiser(*args, **kwargs)[0].float()


def _input_and_t(args, kwargs):
    return (args[0], args[1]) if args else (kwargs["hidden_states"], kwargs["timestep"])


COND, UNCOND = slice(N, 2 * N), slice(0, N)


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3"])
def case(request):
    pipe = tiny_family(request.param)
    pipe.set_progress_bar_config(disable=True)
    target = from_pipeline(pipe, device="cpu")
    sampler = Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=N, seed=0, detectors=available())
    batch = next(iter(sampler.run(PROMPTS, GENERATIONS)))
    denoiser, calls = _record(pipe, batch.seeds)
    assert len(calls) == STEPS
    return request.param, pipe, denoiser, calls, batch, sampler


def _by_hand(denoiser, calls):
    """(cond, uncond) predictions at every recorded step, by separate plain calls."""
    with torch.no_grad():
        return [(_call(denoiser, a, k, COND), _call(denoiser, a, k, UNCOND)) for a, k in calls]


def test_wen_first_and_all_equal_the_norms_by_hand(case):
    _, _, denoiser, calls, batch, _ = case
    norms = torch.stack([(c - u).flatten(1).norm(dim=1) for c, u in _by_hand(denoiser, calls)], dim=1)
    torch.testing.assert_close(batch.detectors["wen_first"], norms[:, 0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batch.detectors["wen_all"], norms.mean(1), rtol=1e-4, atol=1e-6)
    assert float(norms.min()) > 1e-3


def _cos(c, u):
    """Asthana & Belagiannis' alignment by hand: per latent position, cos(u, c - u) over the channels; the mean."""
    d = c - u
    cos = (u * d).sum(1) / (u.norm(dim=1) * d.norm(dim=1))
    return cos.flatten(1).mean(1)


def test_anisotropy_equals_the_formula_by_hand(case):
    _, _, denoiser, calls, batch, _ = case
    (c0, u0) = _by_hand(denoiser, calls[:1])[0]
    norm = (c0 - u0).flatten(1).norm(dim=1)
    args, kwargs = calls[0]
    x0, _ = _input_and_t(args, kwargs)
    t_lo = _input_and_t(*calls[-3])[1]  # the third timestep from the end, fed the first step's (pure noise) input
    with torch.no_grad():
        c_lo = _call(denoiser, args, kwargs, COND, x=x0[N:], t=_halves(t_lo, COND) if t_lo.ndim else t_lo)
        u_lo = _call(denoiser, args, kwargs, UNCOND, x=x0[:N], t=_halves(t_lo, UNCOND) if t_lo.ndim else t_lo)
    torch.testing.assert_close(batch.detectors["anisotropy"], norm + 2 * _cos(c_lo, u_lo), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.detectors["anisotropy_first"], norm + 2 * _cos(c0, u0), rtol=1e-4, atol=1e-5)
    assert float((batch.detectors["anisotropy"] - batch.detectors["anisotropy_first"]).abs().max()) > 1e-4


def test_sharpness_equals_a_finite_difference_of_the_predictions(case):
    name, pipe, denoiser, calls, batch, _ = case
    args, kwargs = calls[0]
    x0, t0 = _input_and_t(args, kwargs)
    wide = copy.deepcopy(denoiser).double()
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() and i == 0 else a
              for i, a in enumerate(args)]
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
                {kk: vv.double() for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in kwargs.items()}
    x64 = x0.double()
    with torch.no_grad():
        c, u = _call(wide, args64, kw64, COND).double(), _call(wide, args64, kw64, UNCOND).double()
        v = c - u
        h = 1e-4
        diffs = []
        for part in (COND, UNCOND):
            plus = _call_double(wide, args64, kw64, part, x64[part] + h * v)
            minus = _call_double(wide, args64, kw64, part, x64[part] - h * v)
            diffs.append((plus - minus) / (2 * h))
    product = (diffs[0] - diffs[1]).flatten(1).norm(dim=1)
    if name == "sd3":
        sigma2 = 1.0  # a flow model's velocity: no sigma factor
    else:
        t = float(t0.reshape(-1)[0])
        assert t == int(t)
        sigma2 = float(1 - pipe.scheduler.alphas_cumprod[int(t)])
    torch.testing.assert_close(batch.detectors["sharpness"].double(), product / sigma2, rtol=2e-3, atol=1e-6)
    assert float(product.min()) > 1e-4


def _call_double(denoiser, args, kwargs, part, x):
    args, kwargs = [_halves(a, part) for a in args], _halves(kwargs, part)
    if args:
        args[0] = x
    else:
        kwargs["hidden_states"] = x
    kwargs["return_dict"] = False
    return denoiser(*args, **kwargs)[0].double()


def test_extra_calls_are_counted(case):
    *_, sampler = case
    # anisotropy and sharpness: 2 evaluations per image each
    assert sampler.detector_calls == 4 * N


def test_names_resolve_and_bad_names_are_refused():
    assert default_names() == ["wen_first", "wen_all", "anisotropy_first", "memattn", "bright_ending"]
    assert resolve_names(None) == resolve_names("default") == default_names()
    assert resolve_names("all") == available()
    assert resolve_names("sharpness, wen_first,sharpness") == ["sharpness", "wen_first"]
    with pytest.raises(ConfigError, match="no detector called 'wen'.*memaudit detectors"):
        resolve_names("wen")
    with pytest.raises(ConfigError, match="empty name"):
        resolve_names("wen_first,,")
    assert all(get_detector(n).summary and get_detector(n).source for n in available())


def test_cosine_helper_matches_torch():
    c, u = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    want = F.cosine_similarity(u, c - u, dim=1).flatten(1).mean(1)
    torch.testing.assert_close(_cos(c, u), want)
