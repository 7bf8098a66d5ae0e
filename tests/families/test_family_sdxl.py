"""The SDXL family against plain diffusers and hand computations, on the tiny StableDiffusionXLPipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from memaudit.core.errors import TargetError
from memaudit.data import from_arrays
from memaudit.families import FAMILIES, family_for_class
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline, load_target
from memaudit.tiny_families import RESOLUTION, call_kwargs, tiny_sdxl
from memaudit.training import TrainConfig, train_unet

PROMPTS = ["a photo of a face", "a chest x-ray"]
GENERATIONS = 2
STEPS = 3
GUIDANCE = 4.0


def _pipe(prediction_type: str = "epsilon", **scheduler):
    """The tiny SDXL, its EulerDiscreteScheduler switched to ``prediction_type`` and ``scheduler`` options."""
    pipe = tiny_sdxl()
    if prediction_type != "epsilon" or scheduler:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type,
                                                            **scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(target, guidance: float = GUIDANCE):
    sampler = Sampler(target, steps=STEPS, guidance=guidance, batch_size=4, seed=0)
    return sampler, next(iter(sampler.run(PROMPTS, GENERATIONS)))


def _plain(pipe, seeds, guidance: float = GUIDANCE):
    """Plain diffusers' images for the batch's seeds."""
    prompts = [p for p in PROMPTS for _ in range(GENERATIONS)]
    return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=STEPS,
                guidance_scale=guidance, output_type="pt", **call_kwargs(pipe)).images


def _time_ids(n: int) -> torch.Tensor:
    """SDXL's added time ids of a RESOLUTION px image: original size, crop top-left (0, 0), target size."""
    return torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32).repeat(n, 1)


def _unet(pipe, x, t, embeds, pooled):
    added = {"text_embeds": pooled, "time_ids": _time_ids(len(x))}
    return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]


def _eps(output, x, alpha_bar, prediction_type):
    if prediction_type == "epsilon":
        return output
    a = torch.as_tensor(alpha_bar, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return a.sqrt() * output + (1 - a).sqrt() * x  # v = sqrt(a) eps - sqrt(1-a) x0


def _capture(pipe):
    """Forward hooks recording every UNet call's (input, timestep, output) of a plain pipeline run."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((args[0].detach().clone(), torch.as_tensor(args[1]).detach().clone(), output[0].detach().clone()))

    return calls, pipe.unet.register_forward_hook(hook, with_kwargs=True)


def test_registered():
    assert family_for_class("StableDiffusionXLPipeline") is FAMILIES["sdxl"]
    target = from_pipeline(_pipe(), device="cpu")
    assert target.family.name == "sdxl"
    assert target.resolution == RESOLUTION and target.latent_shape == (4, 16, 16)
    assert [type(m).__name__ for m in target.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    blocks = target.family.blocks(target.unet)
    assert blocks == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert all(target.unet.get_submodule(b) is not None for b in blocks)
    # gradient flows through the prompt encoding when enabled (text-encoder training)
    target.pipe.text_encoder_2.requires_grad_(True)
    cond = target.embed(["a photo"])
    assert all(v.requires_grad for v in cond.tensors.values())
    assert cond.tensors["prompt_embeds"].shape == (1, 16, 32) and cond.tensors["pooled_prompt_embeds"].shape == (1, 16)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_images_equal_plain_diffusers(prediction_type):
    pipe = _pipe(prediction_type)
    _, batch = _sample(from_pipeline(pipe, device="cpu"))
    assert batch.images.shape == (4, 3, RESOLUTION, RESOLUTION)
    assert float((batch.images - _plain(pipe, batch.seeds)).abs().max()) <= 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_first_step_norm_equals_independent_computation(prediction_type):
    pipe = _pipe(prediction_type)
    sampler, batch = _sample(from_pipeline(pipe, device="cpu"))
    n = len(batch.seeds)
    prompts = [p for p in PROMPTS for _ in range(GENERATIONS)]
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                    do_classifier_free_guidance=True)
        assert torch.count_nonzero(neg_embeds) == 0 and torch.count_nonzero(neg_pooled) == 0  # force_zeros
        sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(STEPS)
        t, sigma = sched.timesteps[0], float(sched.sigmas[0])
        noise = randn_tensor((n, 4, 16, 16), generator=[torch.Generator().manual_seed(s) for s in batch.seeds])
        x = noise * sched.init_noise_sigma / (sigma**2 + 1) ** 0.5
        tt = t.reshape(1).expand(n)
        out_c = _unet(pipe, x, tt, embeds, pooled)
        out_u = _unet(pipe, x, tt, neg_embeds, neg_pooled)
    a = 1 / (1 + sigma**2)
    want = (_eps(out_c, x, a, prediction_type) - _eps(out_u, x, a, prediction_type)).flatten(1).norm(dim=1)
    torch.testing.assert_close(batch.guidance_norms[:, 0], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sampler.first_step_norms(PROMPTS, GENERATIONS), want, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(batch.guidance_norms).all() and batch.guidance_norms.shape == (n, STEPS)


def test_first_step_is_the_pipelines_first_unet_input():
    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    seeds = [3, 4]
    calls, handle = _capture(pipe)
    try:
        pipe(prompt=["a", "b"], generator=[torch.Generator().manual_seed(s) for s in seeds],
             num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent", **call_kwargs(pipe))
    finally:
        handle.remove()
    x, t = target.family.first_step(pipe, target.family.initial_latents(pipe, seeds, RESOLUTION), STEPS, RESOLUTION)
    x_pipe, t_pipe, _ = calls[0]
    torch.testing.assert_close(x, x_pipe[2:], rtol=0, atol=1e-6)  # the conditional half
    assert float(t) == float(t_pipe)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_eps_noise_and_target_by_hand(prediction_type):
    target = from_pipeline(_pipe(prediction_type), device="cpu")
    g = torch.Generator().manual_seed(0)
    x, x0, noise = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
    t = torch.tensor([999, 400])
    cond = target.encode_prompts(PROMPTS)
    with torch.no_grad():
        embeds, _, pooled, _ = target.pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
        out = _unet(target.pipe, x, t, embeds, pooled)
        got = target.predict_eps(x, t, cond)
    a = target.scheduler.alphas_cumprod[t].float()
    torch.testing.assert_close(got, _eps(out, x, a, prediction_type), rtol=1e-5, atol=1e-5)
    ar = a.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(target.add_noise(x0, noise, t), ar.sqrt() * x0 + (1 - ar).sqrt() * noise)
    goal = noise if prediction_type == "epsilon" else ar.sqrt() * noise - (1 - ar).sqrt() * x0
    torch.testing.assert_close(target.training_target(x0, noise, t), goal)


def test_training_runs_and_lowers_the_loss():
    target = from_pipeline(_pipe(), device="cpu")
    rng = np.random.default_rng(0)
    images = rng.random((4, RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    data = from_arrays(images, [f"a photo of item {i}" for i in range(4)])
    cfg = dict(batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0, log_every=0)
    before = {k: v.clone() for k, v in target.unet.state_dict().items()}
    result = train_unet(target, data, TrainConfig(steps=5, **cfg), params=list(target.unet.parameters()))
    assert result.steps == 5 and all(np.isfinite(result.losses))
    assert any(not torch.equal(before[k], v) for k, v in target.unet.state_dict().items())

    one = from_arrays(np.repeat(images[:1], 2, axis=0), ["a photo of item 0"] * 2)
    x0 = target.encode_images(torch.as_tensor(images[:1]).permute(0, 3, 1, 2) * 2 - 1)[0]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    cond = target.encode_prompts(["a photo of item 0"])

    def loss() -> float:
        with torch.no_grad():
            out = target.denoise(target.add_noise(x0, noise, t), t, cond)
        return float((out - target.training_target(x0, noise, t)).pow(2).mean())

    first = loss()
    train_unet(target, one, TrainConfig(steps=20, **cfg), params=list(target.unet.parameters()))
    assert loss() < 0.9 * first, (first, loss())


def test_load_target_round_trip_and_missing_component(tmp_path):
    pipe = _pipe()
    folder = tmp_path / "sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    loaded = load_target(folder, device="cpu")
    assert loaded.family.name == "sdxl"
    assert loaded.pipe.config.force_zeros_for_empty_prompt is True
    _, batch = _sample(loaded)
    _, mine = _sample(from_pipeline(pipe, device="cpu"))
    assert float((batch.images - mine.images).abs().max()) <= 1e-5
    torch.testing.assert_close(batch.guidance_norms, mine.guidance_norms, rtol=1e-5, atol=1e-6)

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(TargetError) as err:
        load_target(broken, device="cpu")
    assert "text_encoder_2" in str(err.value) and "\n" not in str(err.value)


def test_force_zeros_off_uses_the_encoded_empty_prompt(tmp_path):
    pipe = _pipe()
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    target = from_pipeline(pipe, device="cpu")
    uncond = target.unconditional(1)
    with torch.no_grad():
        _, neg, _, neg_pooled = pipe.encode_prompt(["x"], device="cpu", do_classifier_free_guidance=True)
    assert torch.count_nonzero(neg) > 0
    torch.testing.assert_close(uncond.tensors["prompt_embeds"], neg)
    torch.testing.assert_close(uncond.tensors["pooled_prompt_embeds"], neg_pooled)
    _, batch = _sample(target)
    assert float((batch.images - _plain(pipe, batch.seeds)).abs().max()) <= 1e-5
    # the setting survives save and load
    pipe.save_pretrained(tmp_path / "off", safe_serialization=True)
    assert load_target(tmp_path / "off", device="cpu").pipe.config.force_zeros_for_empty_prompt is False
    # and with it on (the default) the unconditional is zeros
    zeros = from_pipeline(_pipe(), device="cpu").unconditional(1)
    assert all(torch.count_nonzero(v) == 0 for v in zeros.tensors.values())
    assert zeros.tensors["prompt_embeds"].shape == neg.shape


@pytest.mark.parametrize("scheduler", [dict(timestep_spacing="linspace"),
                                       dict(timestep_spacing="linspace", use_karras_sigmas=True)],
                         ids=["linspace", "karras"])
def test_fractional_timesteps_v_prediction(scheduler):
    """Euler's fractional timesteps: eps uses the scheduler's own sigma at every step, not a linear alpha_bar."""
    pipe = _pipe("v_prediction", **scheduler)
    target = from_pipeline(pipe, device="cpu")
    _, batch = _sample(target)
    calls, handle = _capture(pipe)
    try:
        images = _plain(pipe, batch.seeds)
    finally:
        handle.remove()
    assert float((batch.images - images).abs().max()) <= 1e-5
    n = len(batch.seeds)
    fractional = [i for i, (_, t, _) in enumerate(calls) if float(t) != round(float(t))]
    assert fractional  # the case under test
    for i, (x, t, out) in enumerate(calls):
        a = 1 / (1 + float(pipe.scheduler.sigmas[i]) ** 2)
        eps = _eps(out, x, a, "v_prediction")
        want = (eps[n:] - eps[:n]).flatten(1).norm(dim=1)
        torch.testing.assert_close(batch.guidance_norms[:, i], want, rtol=1e-4, atol=1e-6)
        assert float(target.family.alpha_bar(pipe, t)) == pytest.approx(a, rel=1e-5)
    # on a long schedule (low fractional timesteps, where interpolating alpha_bar linearly is off by up to 4e-3)
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    a = target.family.alpha_bar(pipe, sched.timesteps).double()
    want = 1 / (1 + sched.sigmas[:-1].double() ** 2)
    torch.testing.assert_close((1 - a).sqrt(), (1 - want).sqrt(), rtol=1e-5, atol=0)


def test_guidance_one_scores_with_an_extra_call():
    pipe = _pipe("v_prediction")
    sampler, batch = _sample(from_pipeline(pipe, device="cpu"), guidance=1.0)
    assert float((batch.images - _plain(pipe, batch.seeds, guidance=1.0)).abs().max()) <= 1e-5
    torch.testing.assert_close(batch.guidance_norms[:, 0], sampler.first_step_norms(PROMPTS, GENERATIONS),
                               rtol=1e-4, atol=1e-6)
    assert torch.isnan(batch.guidance_norms[:, 1:]).all() and sampler.extra_calls == 4  # one per image


def test_refuses_continuous_timesteps():
    pipe = _pipe("v_prediction", timestep_type="continuous")
    with pytest.raises(TargetError, match="timestep"):
        from_pipeline(pipe, device="cpu")
