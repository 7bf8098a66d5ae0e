"""The Flux.1 family (memaudit.families.flux) on the tiny FluxPipeline, dev and schnell: images equal plain
diffusers', the score's extra transformer calls and their norms equal independent computations, packing, the
noise/eps formulas, training, loading.

The denoising strength of a flow-matching model is measured on the velocity: the first sampling step is at sigma = 1,
where ``eps = x_t + (1 - sigma) v`` is ``x_t`` whatever the prediction, so an eps-space norm would be 0 there.
"""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch

from memaudit.core.errors import TargetError
from memaudit.data import from_arrays
from memaudit.families import FAMILIES
from memaudit.families.base import pack_2x2, unpack_2x2
from memaudit.families.flux import Flux, latent_image_ids
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline, load_target
from memaudit.tiny_families import RESOLUTION, call_kwargs, tiny_flux
from memaudit.training import TrainConfig, train_unet

PROMPTS = ["a photo of a face", "a chest x-ray"]
GENERATIONS = 2
STEPS = 3
GUIDANCE = 4.0
VARIANTS = ("dev", "schnell")


@pytest.fixture(scope="module")
def pipes():
    built = {}

    def get(variant):
        if variant not in built:
            p = tiny_flux(variant)
            p.set_progress_bar_config(disable=True)
            built[variant] = p
        return built[variant]

    return get


def _counting(module):
    """A forward hook counting the module's calls (our own extra calls included)."""
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    return counter, module.register_forward_hook(hook)


def _plain(pipe, seeds, record=None):
    """Plain diffusers: prompts as strings, one generator per image; ``record`` collects every transformer call's
    keyword arguments (cloned)."""
    handle = None
    if record is not None:
        def hook(module, args, kwargs):
            record.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return pipe(prompt=[p for p in PROMPTS for _ in range(GENERATIONS)],
                    generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, output_type="pt", **call_kwargs(pipe)).images
    finally:
        if handle is not None:
            handle.remove()


def _independent_norms(pipe, calls):
    """Per recorded call: the same packed latents, timestep, guidance and ids through the transformer once with the
    prompts' and once with the empty prompt's embeddings (the pipeline's own encode_prompt); the norm of the
    velocity difference per image."""
    prompts = [p for p in PROMPTS for _ in range(GENERATIONS)]
    with torch.no_grad():
        pe, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")  # the pipeline's default T5 length
        ue, upooled, _ = pipe.encode_prompt([""] * len(prompts), None, device="cpu")
        out = []
        for kw in calls:
            x, t = kw["hidden_states"], kw["timestep"]  # t is sigma (the pipeline passes timestep / 1000)
            common = dict(hidden_states=x, timestep=t, guidance=kw["guidance"], txt_ids=kw["txt_ids"],
                          img_ids=kw["img_ids"], return_dict=False)
            v_c = pipe.transformer(encoder_hidden_states=pe, pooled_projections=pooled, **common)[0]
            v_u = pipe.transformer(encoder_hidden_states=ue, pooled_projections=upooled, **common)[0]
            out.append((v_c.float() - v_u.float()).flatten(1).norm(dim=1))
    return torch.stack(out, dim=1)


def test_registered():
    fam = FAMILIES["flux"]
    assert isinstance(fam, Flux) and fam.pipeline_classes == ("FluxPipeline",)
    assert fam.classifier_free_guidance is False and fam.flow
    from diffusers import FluxPipeline

    # direct calls embed the pipeline's default guidance (also train_dreambooth_flux.py's --guidance_scale default)
    assert fam.guidance_scale == inspect.signature(FluxPipeline.__call__).parameters["guidance_scale"].default


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_default_window(pipes, variant, monkeypatch):
    """Images equal plain diffusers'; one extra transformer call per batch (the first step), counted once per image;
    NaN elsewhere; the first-step norm equals an independent computation and the direct first-step computation."""
    pipe = pipes(variant)
    target = from_pipeline(pipe, device="cpu")
    assert target.resolution == RESOLUTION and target.latent_shape == (16, RESOLUTION // 2, RESOLUTION // 2)
    sampler = Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0)
    counter, handle = _counting(pipe.transformer)
    try:
        batches = list(sampler.run(PROMPTS, GENERATIONS))
    finally:
        handle.remove()
    assert len(batches) == 1
    batch = batches[0]
    assert counter["n"] == STEPS + 1 and sampler.extra_calls == 4  # one batched call: one per image

    calls = []
    plain = _plain(pipe, batch.seeds, record=calls)
    assert float((plain - batch.images).abs().max()) <= 1e-5
    assert float((batch.images[0] - batch.images[2]).abs().max()) > 1e-3
    assert len(calls) == STEPS and calls[0]["hidden_states"].shape == (4, (RESOLUTION // 4) ** 2, 64)
    assert (calls[0]["guidance"] is not None) == (variant == "dev")

    norms = batch.guidance_norms
    assert norms.shape == (4, STEPS) and torch.isnan(norms[:, 1:]).all() and torch.isfinite(norms[:, 0]).all()
    torch.testing.assert_close(norms[:, 0], _independent_norms(pipe, calls[:1])[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch.timesteps, torch.stack([kw["timestep"][0] for kw in calls]) * 1000)

    # the direct first step: family.first_step + predict_eps, embedding the audit's guidance (see Flux docstring)
    monkeypatch.setattr(target.family, "guidance_scale", GUIDANCE)
    x, t = target.family.first_step(pipe, sampler.initial_latents(batch.seeds), STEPS, target.resolution)
    torch.testing.assert_close(pack_2x2(x), calls[0]["hidden_states"], rtol=0, atol=0)
    assert float(t) == pytest.approx(float(calls[0]["timestep"][0]) * 1000, abs=1e-3)
    torch.testing.assert_close(sampler.first_step_norms(PROMPTS, GENERATIONS), norms[:, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_step_scored_by_extra_calls(pipes, variant):
    """With score_window (0, None) every step costs one extra call, and every norm equals the independent one."""
    pipe = pipes(variant)
    target = from_pipeline(pipe, device="cpu")
    sampler = Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0, score_window=(0, None))
    counter, handle = _counting(pipe.transformer)
    try:
        batch = next(iter(sampler.run(PROMPTS, GENERATIONS)))
    finally:
        handle.remove()
    assert counter["n"] == 2 * STEPS and sampler.extra_calls == 4 * STEPS  # per image and scored step
    calls = []
    torch.testing.assert_close(_plain(pipe, batch.seeds, record=calls), batch.images, rtol=0, atol=1e-5)
    expected = _independent_norms(pipe, calls)
    torch.testing.assert_close(batch.guidance_norms, expected, rtol=1e-4, atol=1e-5)
    assert float(expected[:, 1:].min()) > 1e-3  # the later steps carry a real signal
    # the schedule: dev shifts dynamically (mu from the token count), schnell statically with shift 1
    seen = torch.stack([kw["timestep"][0] for kw in calls]) * 1000
    latents = sampler.initial_latents(batch.seeds)
    torch.testing.assert_close(target.family.sampling_timesteps(pipe, latents, STEPS), seen, rtol=0, atol=1e-3)
    linear = torch.tensor([1000.0, 1000 * 2 / 3, 1000 / 3])
    assert (float((seen - linear).abs().max()) > 1.0) == (variant == "dev")


def test_packing_ids_and_initial_latents(pipes):
    from diffusers import FluxPipeline

    pipe = pipes("dev")
    x = torch.randn(3, 16, 8, 6)
    packed = FluxPipeline._pack_latents(x, 3, 16, 8, 6)
    assert torch.equal(pack_2x2(x), packed)
    assert torch.equal(unpack_2x2(packed, 8, 6), x)
    # _unpack_latents takes pixel sizes
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * 2, 6 * 2, 2), unpack_2x2(packed, 8, 6))
    assert torch.equal(latent_image_ids(4, 3), FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32))
    fam = FAMILIES["flux"]
    seeds = [11, 12]
    drawn, _ = pipe.prepare_latents(2, 16, RESOLUTION, RESOLUTION, torch.float32, torch.device("cpu"),
                                    [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(fam.initial_latents(pipe, seeds, RESOLUTION), drawn)
    assert fam.blocks(pipe.transformer) == ["transformer_blocks.0", "single_transformer_blocks.0"]


def _pipeline_pack(x):
    """FluxPipeline's own packing of unpacked latents."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def _pipeline_unpack(x):
    """FluxPipeline's own unpacking, for images of RESOLUTION px (vae_scale_factor 2)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(x, RESOLUTION, RESOLUTION, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_predict_eps_noise_and_targets(pipes, variant):
    pipe = pipes(variant)
    target = from_pipeline(pipe, device="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((2, *target.latent_shape), generator=g)
    t = torch.tensor([250.0, 750.0])
    cond = target.encode_prompts(PROMPTS)
    assert set(cond.tensors) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert cond.embeds.shape[1] == 512  # FluxPipeline's default max_sequence_length
    h = RESOLUTION // 4
    guidance = torch.full((2,), 3.5) if variant == "dev" else None
    with torch.no_grad():
        v = pipe.transformer(hidden_states=_pipeline_pack(x), timestep=t / 1000, guidance=guidance,
                             pooled_projections=cond.tensors["pooled_prompt_embeds"],
                             encoder_hidden_states=cond.embeds, txt_ids=torch.zeros(512, 3),
                             img_ids=latent_image_ids(h, h), return_dict=False)[0]
        v = _pipeline_unpack(v)
        torch.testing.assert_close(target.denoise(x, t, cond), v)
        s = (t / 1000).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(target.predict_eps(x, t, cond), x + (1 - s) * v)
        other = target.family.denoise(pipe, x, t, cond, guidance=1.0)
        assert (float((other - v).abs().max()) > 1e-6) == (variant == "dev")
    x0, noise = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    torch.testing.assert_close(target.add_noise(x0, noise, t), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(target.training_target(x0, noise, t), noise - x0)
    assert target.scaling_factor == pytest.approx(0.3611) and target.shift_factor == pytest.approx(0.1159)


def _dataset(n, seed=0):
    rng = np.random.default_rng(seed)
    return from_arrays(rng.random((n, RESOLUTION, RESOLUTION, 3), dtype=np.float32),
                       [f"a photo of item {i}" for i in range(n)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_runs_and_lowers_the_loss(variant):
    target = from_pipeline(tiny_flux(variant), device="cpu")
    result = train_unet(target, _dataset(4), TrainConfig(steps=5, batch_size=2, learning_rate=1e-4, caption_dropout=0.0,
                                                         seed=0, log_every=0),
                        params=list(target.unet.parameters()))
    assert result.steps == 5 and all(np.isfinite(result.losses))

    one = _dataset(1, seed=1)
    x0 = target.encode_images(one.images)[0].expand(3, -1, -1, -1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 600.0, 900.0])
    cond = target.encode_prompts(one.captions * 3)

    def loss():
        with torch.no_grad():
            out = target.denoise(target.add_noise(x0, noise, t), t, cond)
            return float((out - target.training_target(x0, noise, t)).pow(2).mean())

    before = loss()
    train_unet(target, one, TrainConfig(steps=20, batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0,
                                        log_every=0), params=list(target.unet.parameters()))
    after = loss()
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_target_round_trip(pipes, variant, tmp_path):
    pipe = pipes(variant)
    sampler = Sampler(from_pipeline(pipe, device="cpu"), steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0)
    first = next(iter(sampler.run(PROMPTS, GENERATIONS)))
    pipe.save_pretrained(tmp_path / "flux", safe_serialization=True)
    loaded = load_target(tmp_path / "flux", device="cpu")
    assert loaded.family.name == "flux" and loaded.family.guidance_embedded(loaded.pipe) == (variant == "dev")
    again = next(iter(Sampler(loaded, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0).run(PROMPTS, GENERATIONS)))
    assert float((again.images - first.images).abs().max()) <= 1e-5
    torch.testing.assert_close(again.guidance_norms, first.guidance_norms, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_missing_component_is_one_line(pipes, tmp_path):
    folder = tmp_path / "flux"
    pipes("schnell").save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TargetError) as err:
        load_target(folder, device="cpu")
    assert "text_encoder_2" in str(err.value) and "\n" not in str(err.value)


def test_audit_rows_score_the_first_step_and_the_note_counts_every_extra_call(pipes, tmp_path):
    """results.json: every image's denoising_norm is its first-step norm (the scored window), not null; the note
    counts one extra evaluation per audited and reference image."""
    from memaudit.audit import AuditConfig, run_audit

    target = from_pipeline(pipes("dev"), device="cpu")
    g = torch.Generator().manual_seed(0)
    dataset = from_arrays(torch.rand(3, 3, RESOLUTION, RESOLUTION, generator=g), [f"item {i}" for i in range(3)])
    res = run_audit(target, dataset, tmp_path / "out", reference_prompts=["a square"],
                    config=AuditConfig(generations=2, steps=3, batch_size=4, min_clique=2, device="cpu"))
    norms = [im["denoising_norm"] for im in res["images"]]
    assert len(norms) == 6 and all(isinstance(v, float) and v > 0 for v in norms)
    by_prompt = [np.mean([im["denoising_norm"] for im in res["images"] if im["prompt_index"] == i]) for i in range(3)]
    np.testing.assert_allclose(by_prompt, [p["denoising_score"] for p in res["prompts"]], rtol=1e-5)
    note = res["summary"]["denoising_note"]
    assert "at the first step (8 in all, audited and reference images together)" in note, note
