"""The attention detectors (Ren et al.'s entropy, Chen et al.'s bright ending) against hand computations on tiny
pipelines with cross-attention (SD 1.x, SDXL, PixArt): the plain pipeline runs with every cross-attention layer's
inputs recorded, the probabilities are recomputed by hand (projections, heads, softmax), and each paper's formula is
applied. The tiny models' keys are sharpened so that attention is far from uniform. The sampled images stay plain
diffusers' images: reading attention changes nothing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memaudit.sampling import Sampler
from memaudit.target import from_pipeline
from memaudit.tiny_families import call_kwargs, tiny_family

PROMPTS = ["a photo of a face", "a chest x-ray of a patient"]
GENERATIONS = 2
STEPS = 3
GUIDANCE = 4.0
N = len(PROMPTS) * GENERATIONS


def _sharpened(name: str):
    pipe = tiny_family(name)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    with torch.no_grad():
        for _, m in denoiser.named_modules():
            if type(m).__name__ == "Attention" and m.is_cross_attention:
                m.to_k.weight.mul_(25.0)
    return pipe, denoiser


def _probs_by_hand(module, h, e, mask):
    """Softmax(q k^T / sqrt(d)) per head, conditional half, mean over heads: ``[N, queries, keys]``."""
    b = h.shape[0]
    q = module.to_q(h).view(b, h.shape[1], module.heads, -1).transpose(1, 2)
    k = module.to_k(e).view(b, e.shape[1], module.heads, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:  # PixArt: the T5 padding, as the pipeline's additive bias [B, 1, keys]
        logits = logits + mask[:, None]
    return logits.softmax(-1)[N:].mean(1)


def _record(pipe, denoiser, seeds):
    """Plain diffusers; per call (step), every cross-attention layer's probabilities by hand, and the CFG halves'
    predictions (cond, uncond) as the pipeline computed them."""
    layers = {n: m for n, m in denoiser.named_modules() if type(m).__name__ == "Attention" and m.is_cross_attention}
    steps, current, outputs = [], {}, []

    def pre(name):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            current[name] = _probs_by_hand(module, h, kwargs["encoder_hidden_states"], kwargs.get("attention_mask"))
        return hook

    def post(module, args, kwargs, output):
        steps.append(dict(current))
        current.clear()
        out = output[0] if isinstance(output, tuple) else output.sample
        outputs.append(out[:, :4] if out.shape[1] == 8 else out)  # PixArt's learned sigma: the eps part

    handles = [m.register_forward_pre_hook(pre(n), with_kwargs=True) for n, m in layers.items()]
    handles.append(denoiser.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            images = pipe(prompt=[p for p in PROMPTS for _ in range(GENERATIONS)], num_inference_steps=STEPS,
                          generator=[torch.Generator().manual_seed(s) for s in seeds], guidance_scale=GUIDANCE,
                          output_type="pt", **call_kwargs(pipe)).images
    finally:
        for h in handles:
            h.remove()
    return steps, outputs, images


@pytest.fixture(scope="module", params=["sd", "sdxl", "pixart-sigma"])
def case(request):
    pipe, denoiser = _sharpened(request.param)
    target = from_pipeline(pipe, device="cpu")
    sampler = Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=N, seed=0,
                      detectors=["memattn", "bright_ending", "wen_all"])
    batch = next(iter(sampler.run(PROMPTS, GENERATIONS)))
    steps, outputs, images = _record(pipe, denoiser, batch.seeds)
    assert float((images - batch.images).abs().max()) <= 1e-5  # reading attention changes no image
    tokens = target.tokenize([p for p in PROMPTS for _ in range(GENERATIONS)])["attention_mask"].sum(1)
    return target, denoiser, batch, steps, outputs, tokens


def test_memattn_is_the_entropy_of_the_fourth_cross_attention_layer_at_the_first_step(case):
    target, denoiser, batch, steps, _, _ = case
    layers = target.family.cross_attention_layers(denoiser)
    layer = layers[min(3, len(layers) - 1)]
    a = steps[0][layer].mean(1)
    want = -(a * a.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(batch.detectors["memattn"], want, rtol=1e-4, atol=1e-5)
    assert float(want.max() - want.min()) > 1e-3  # the prompts attend differently
    uniform = math.log(a.shape[-1])
    assert float(want.max()) < uniform - 0.05  # far from uniform attention: the sharpened keys


def test_bright_ending_masks_the_guidance_with_the_end_token_map(case):
    target, denoiser, batch, steps, outputs, tokens = case
    layers = [n for n in target.family.cross_attention_layers(denoiser) if n.startswith("down_blocks.")] or \
        target.family.cross_attention_layers(denoiser)[:2]
    last = steps[-1]
    most = max(last[n].shape[1] for n in layers)
    probs = torch.stack([last[n] for n in layers if last[n].shape[1] == most]).mean(0)
    m = probs[torch.arange(N), :, (tokens.clamp(max=probs.shape[2]) - 1)]
    h, w = outputs[0].shape[-2:]
    side = int(math.isqrt(most))
    m = m.reshape(N, 1, side, side)
    if side != h:
        m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    per_step = []
    for out in outputs:  # [uncond; cond] as the pipeline batched them
        delta = out[N:].float() - out[:N].float()
        per_step.append((m * delta).flatten(1).norm(dim=1) / m.flatten(1).mean(1))
    want = torch.stack(per_step, 1).mean(1)
    torch.testing.assert_close(batch.detectors["bright_ending"], want, rtol=1e-4, atol=1e-6)
    # the map is not flat, so the score is not Wen's all-step magnitude
    assert float((batch.detectors["bright_ending"] - batch.detectors["wen_all"]).abs().max()) > 1e-4


def test_no_attention_is_read_without_an_attention_detector(monkeypatch):
    from memaudit.families import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "cross_attention_probs", lambda *a, **k: calls.append(1))
    target = from_pipeline(tiny_family("sd"), device="cpu")
    next(iter(Sampler(target, steps=2, guidance=GUIDANCE, batch_size=N, seed=0,
                      detectors=["wen_first", "anisotropy_first"]).run(PROMPTS, GENERATIONS)))
    assert calls == []
    assert all(type(m.processor).__name__ != "_AttentionTap" for m in target.denoiser.modules()
               if type(m).__name__ == "Attention")
