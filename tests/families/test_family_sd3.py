"""The SD3/SD3.5 family (memaudit.families.sd3) on the tiny StableDiffusion3Pipeline: images equal plain diffusers',
the guidance norms equal independent computations at every step, the noise/eps formulas, training, loading.

The denoising strength of a flow-matching model is measured on the velocity: the first sampling step is at sigma = 1,
where ``eps = x_t + (1 - sigma) v`` is ``x_t`` whatever the prediction, so an eps-space norm would be 0 there.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from memaudit.core.errors import TargetError
from memaudit.data import from_arrays
from memaudit.families import FAMILIES
from memaudit.families.sd3 import StableDiffusion3
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline, load_target
from memaudit.tiny_families import RESOLUTION, call_kwargs, tiny_sd3
from memaudit.training import TrainConfig, train_unet

PROMPTS = ["a photo of a face", "a chest x-ray"]
GENERATIONS = 2
STEPS = 3
GUIDANCE = 4.0


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd3()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def target(pipe):
    return from_pipeline(pipe, device="cpu")


@pytest.fixture(scope="module")
def batch(target):
    batches = list(Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0).run(PROMPTS, GENERATIONS))
    assert len(batches) == 1
    return batches[0]


def _plain(pipe, seeds, guidance=GUIDANCE, record=None):
    """Plain diffusers: prompts as strings, one generator per image; ``record`` collects every transformer call's
    inputs (keyword arguments, cloned)."""
    handle = None
    if record is not None:
        def hook(module, args, kwargs):
            record.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return pipe(prompt=[p for p in PROMPTS for _ in range(GENERATIONS)],
                    generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                    guidance_scale=guidance, output_type="pt", **call_kwargs(pipe)).images
    finally:
        if handle is not None:
            handle.remove()


def _hand_eps(v, x, t):
    """eps = x_t + (1 - sigma) v with sigma = t / 1000, by hand."""
    s = t.float().reshape(-1, 1, 1, 1) / 1000.0
    return x.float() + (1 - s) * v.float()


def _independent_norms(pipe, calls, n):
    """Per recorded step: separate conditional and unconditional transformer calls on the step's latents, from the
    pipeline's own ``encode_prompt`` (empty negative prompt), converted to eps by hand; the norm per image."""
    prompts = [p for p in PROMPTS for _ in range(GENERATIONS)]
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                      do_classifier_free_guidance=True)  # default T5 length
        out = []
        for kw in calls:
            x = kw["hidden_states"][-n:]  # the conditional half (the unconditional one holds the same latents)
            t = kw["timestep"][-n:]
            v_c = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled,
                                   return_dict=False)[0]
            v_u = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=npe,
                                   pooled_projections=npooled, return_dict=False)[0]
            out.append((v_c.float() - v_u.float()).flatten(1).norm(dim=1))  # the velocity difference
    return torch.stack(out, dim=1)


def test_registered():
    fam = FAMILIES["sd3"]
    assert isinstance(fam, StableDiffusion3) and fam.pipeline_classes == ("StableDiffusion3Pipeline",)
    assert fam.classifier_free_guidance and fam.flow


def test_images_equal_plain_diffusers(pipe, batch):
    assert batch.images.shape == (4, 3, RESOLUTION, RESOLUTION)
    plain = _plain(pipe, batch.seeds)
    assert float((plain - batch.images).abs().max()) <= 1e-5
    assert float((batch.images[0] - batch.images[2]).abs().max()) > 1e-3  # the prompts make different images


def test_norms_equal_independent_computation_at_every_step(pipe, target, batch):
    calls = []
    _plain(pipe, batch.seeds, record=calls)
    assert len(calls) == STEPS and all(kw["hidden_states"].shape[0] == 8 for kw in calls)  # CFG: doubled batch
    expected = _independent_norms(pipe, calls, 4)
    assert batch.guidance_norms.shape == (4, STEPS)
    assert torch.isfinite(batch.guidance_norms).all()
    torch.testing.assert_close(batch.guidance_norms, expected, rtol=1e-4, atol=1e-5)
    assert float(expected.min()) > 1e-2  # every step carries a real signal, the first included
    assert torch.equal(batch.timesteps, torch.stack([kw["timestep"][0] for kw in calls]))
    # the first-step norms by direct calls (family.first_step + predict_eps) agree
    first = Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0).first_step_norms(PROMPTS, GENERATIONS)
    torch.testing.assert_close(first, batch.guidance_norms[:, 0], rtol=1e-4, atol=1e-5)


def test_guidance_one_scores_by_extra_calls(pipe, target):
    """At guidance 1 the pipeline makes no unconditional call: the hook repeats each scored call (here all)."""
    sampler = Sampler(target, steps=STEPS, guidance=1.0, batch_size=4, seed=0, score_window=(0, None))
    b = next(iter(sampler.run(PROMPTS, GENERATIONS)))
    assert sampler.extra_calls == 4 * STEPS  # one per image and step
    calls = []
    torch.testing.assert_close(_plain(pipe, b.seeds, guidance=1.0, record=calls), b.images, rtol=0, atol=1e-5)
    assert len(calls) == STEPS and calls[0]["hidden_states"].shape[0] == 4
    torch.testing.assert_close(b.guidance_norms, _independent_norms(pipe, calls, 4), rtol=1e-4, atol=1e-5)


def test_first_step_replicates_dynamic_shifting(pipe):
    """An SD3.5-style scheduler with use_dynamic_shifting: first_step's timestep is the pipeline's (mu included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    dynamic = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                              base_image_seq_len=16, max_image_seq_len=256, base_shift=0.5,
                                              max_shift=1.16)
    p = StableDiffusion3Pipeline(**{**pipe.components, "scheduler": dynamic})
    p.set_progress_bar_config(disable=True)
    target = from_pipeline(p, device="cpu")
    steps = 4
    seeds = [3, 4]
    latents = target.family.initial_latents(p, seeds, target.resolution)
    calls = []
    handle = p.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}),
        with_kwargs=True)
    try:
        p(prompt=["a cat", "a dog"], latents=latents, num_inference_steps=steps, guidance_scale=2.0,
          output_type="latent", **call_kwargs(p))
    finally:
        handle.remove()
    x, t = target.family.first_step(p, latents, steps, target.resolution)
    assert torch.equal(x, calls[0]["hidden_states"][2:])
    assert float(t) == float(calls[0]["timestep"][0])
    # the whole schedule is the pipeline's, and mu matters: it is not the static shift-3 schedule
    seen = torch.stack([kw["timestep"][0] for kw in calls])
    torch.testing.assert_close(target.family.sampling_timesteps(p, latents, steps), seen, rtol=0, atol=1e-4)
    static = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    static.set_timesteps(steps)
    assert float((seen - static.timesteps).abs().max()) > 1.0


def test_predict_eps_noise_and_targets(target, pipe):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *target.latent_shape), generator=g)
    t = torch.tensor([250.0, 750.0])
    cond = target.encode_prompts(PROMPTS)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                             pooled_projections=cond.tensors["pooled_prompt_embeds"], return_dict=False)[0]
        torch.testing.assert_close(target.denoise(x, t, cond), v)
        torch.testing.assert_close(target.predict_eps(x, t, cond), _hand_eps(v, x, t))
    x0, noise = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    s = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(target.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target.training_target(x0, noise, t), noise - x0)
    assert target.prediction_type == "flow" and target.resolution == RESOLUTION
    assert target.latent_shape == (16, RESOLUTION // 2, RESOLUTION // 2)
    assert target.scaling_factor == pytest.approx(1.5305) and target.shift_factor == pytest.approx(0.0609)
    # training timesteps: diffusers' logit-normal density (train_dreambooth_sd3.py's default), then the scheduler's
    # static shift (3), as SD3's training scripts get from the scheduler's own timesteps
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(5))
    shifted = 3.0 * u / (1 + 2.0 * u)
    torch.testing.assert_close(target.sample_timesteps(64, torch.Generator().manual_seed(5)), shifted * 1000)


def test_blocks_and_encoding(target, pipe):
    assert target.family.blocks(target.denoiser) == ["transformer_blocks.0", "transformer_blocks.1"]
    names = dict(target.denoiser.named_modules())
    assert all(b in names for b in target.family.blocks(target.denoiser))
    cond = target.embed(["a photo of a face"])
    assert set(cond.tensors) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond.embeds.shape[1] == pipe.tokenizer.model_max_length + 256  # CLIP tokens + the pipeline's T5 length
    # gradients reach the text encoders (encode_prompt is not under no_grad)
    with torch.enable_grad():
        w = pipe.text_encoder_3.get_input_embeddings().weight
        w.requires_grad_(True)
        try:
            target.embed(["a cat"]).embeds.sum().backward()
            assert w.grad is not None and float(w.grad.abs().sum()) > 0
        finally:
            w.requires_grad_(False)
            w.grad = None


def _dataset(n, seed=0):
    rng = np.random.default_rng(seed)
    return from_arrays(rng.random((n, RESOLUTION, RESOLUTION, 3), dtype=np.float32), [f"a photo of item {i}" for i in range(n)])


def test_training_runs_and_lowers_the_loss():
    target = from_pipeline(tiny_sd3(), device="cpu")
    result = train_unet(target, _dataset(4), TrainConfig(steps=5, batch_size=2, learning_rate=1e-4, caption_dropout=0.0,
                                                         seed=0, log_every=0),
                        params=list(target.unet.parameters()))
    assert result.steps == 5 and all(np.isfinite(result.losses))

    one = _dataset(1, seed=1)
    x0 = target.encode_images(one.images)[0]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((3, *x0.shape[1:]), generator=g)
    t = torch.tensor([300.0, 600.0, 900.0])
    cond = target.encode_prompts(one.captions * 3)

    def loss():
        with torch.no_grad():
            x0s = x0.expand(3, -1, -1, -1)
            out = target.denoise(target.add_noise(x0s, noise, t), t, cond)
            return float((out - target.training_target(x0s, noise, t)).pow(2).mean())

    before = loss()
    train_unet(target, one, TrainConfig(steps=20, batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0,
                                        log_every=0), params=list(target.unet.parameters()))
    after = loss()
    assert after < 0.9 * before, (before, after)


def test_load_target_round_trip_and_missing_component(pipe, batch, tmp_path):
    folder = tmp_path / "sd3"
    pipe.save_pretrained(folder, safe_serialization=True)
    loaded = load_target(folder, device="cpu")
    assert loaded.family.name == "sd3"
    again = next(iter(Sampler(loaded, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0).run(PROMPTS, GENERATIONS)))
    assert float((again.images - batch.images).abs().max()) <= 1e-5
    torch.testing.assert_close(again.guidance_norms, batch.guidance_norms, rtol=1e-4, atol=1e-5)

    broken = tmp_path / "no-t5"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_3")
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_3"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TargetError) as err:
        load_target(broken, device="cpu")
    assert "text_encoder_3" in str(err.value) and "\n" not in str(err.value)
