"""The PixArt family (PixArt-Sigma and PixArt-Alpha): images equal plain diffusers', the denoising strength equals an
independent computation, eps/noising/training follow the hand formulas, folders load, and the PixArt specifics
(learned-sigma split, attention masks, PixArt-Alpha's resolution micro-conditions) behave as the pipelines do."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from memaudit.core.errors import TargetError
from memaudit.families import family_of, sample
from memaudit.families.pixart import PixArt
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline, load_target
from memaudit.tiny_families import RESOLUTION, T5_MAX_LENGTH, call_kwargs, tiny_pixart_sigma

PROMPTS = ["a photo of a face", "a chest x-ray"]
STEPS, GUIDANCE = 3, 4.0


def _pipe(kind: str = "sigma", **transformer_changes):
    """The tiny PixArt-Sigma pipeline, or PixArt-Alpha with the same components; ``transformer_changes`` rebuild
    the transformer from a changed config (seeded)."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    pipe = tiny_pixart_sigma()
    if transformer_changes:
        torch.manual_seed(1)
        config = {**pipe.transformer.config, **transformer_changes}
        pipe.transformer = PixArtTransformer2DModel.from_config(config).eval()
    if kind == "alpha":
        pipe = PixArtAlphaPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_kwargs() -> dict:
    # call_kwargs knows PixArt-Sigma; PixArt-Alpha needs the same (binning off, no cleaning, 32 T5 tokens)
    return call_kwargs("pixart-sigma")


def _plain(pipe, prompts, seeds, guidance=GUIDANCE, **extra):
    """Plain diffusers: the same pipeline object called with prompts and per-image generators."""
    return pipe(prompt=list(prompts), generator=[torch.Generator().manual_seed(s) for s in seeds],
                num_inference_steps=STEPS, guidance_scale=guidance, output_type="pt",
                **{**_plain_kwargs(), **extra}).images


def _first_batch(target, guidance=GUIDANCE):
    sampler = Sampler(target, steps=STEPS, guidance=guidance, batch_size=4, seed=0)
    return sampler, next(sampler.run(PROMPTS, 2))


def _hand_eps(pipe, x, t, embeds, mask, added=None):
    """A direct transformer call as the pipeline makes it, first half of the channels (learned sigma)."""
    out = pipe.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                           timestep=torch.as_tensor(t).reshape(-1).expand(x.shape[0]),
                           added_cond_kwargs=added or {"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert out.shape[1] == 2 * x.shape[1]
    return out[:, : x.shape[1]]


# ---------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_images_equal_plain_diffusers(kind):
    pipe = _pipe(kind)
    target = from_pipeline(pipe, device="cpu")
    assert isinstance(target.family, PixArt) and target.resolution == RESOLUTION
    assert target.family.max_sequence_length(pipe) == T5_MAX_LENGTH  # min(tokenizer's 32, Sigma 300 / Alpha 120)
    _, batch = _first_batch(target)
    assert batch.images.shape == (4, 3, RESOLUTION, RESOLUTION)
    ref = _plain(pipe, [p for p in PROMPTS for _ in range(2)], batch.seeds)
    assert float((batch.images - ref).abs().max()) <= 1e-5
    assert torch.isfinite(batch.guidance_norms).all() and batch.guidance_norms.shape == (4, STEPS)


def test_max_sequence_length_defaults_of_the_pipelines():
    family = PixArt()
    for pipe, default in ((_pipe("sigma"), 300), (_pipe("alpha"), 120)):
        pipe.tokenizer = copy.copy(pipe.tokenizer)  # the tiny tokenizer is cached and shared: change a copy
        pipe.tokenizer.model_max_length = 512  # as T5-XXL's tokenizer says
        assert family.max_sequence_length(pipe) == default
        cond = family.encode(pipe, ["a cat"], torch.device("cpu"))
        assert cond.embeds.shape[1] == default and cond.tensors["prompt_attention_mask"].shape == (1, default)


@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_first_step_strength_equals_independent_computation(kind):
    pipe = _pipe(kind)
    target = from_pipeline(pipe, device="cpu")
    sampler, batch = _first_batch(target)
    prompts = [p for p in PROMPTS for _ in range(2)]
    with torch.no_grad():
        # the pipeline's own encoding, with its own unconditional (empty prompt, same length and mask)
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, True, device="cpu", clean_caption=False,
                                                         max_sequence_length=T5_MAX_LENGTH)
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(STEPS)
        t = sched.timesteps[0]
        x = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in batch.seeds])
        x = sched.scale_model_input(x * sched.init_noise_sigma, t)
        eps_c = _hand_eps(pipe, x, t, embeds, mask)
        eps_u = _hand_eps(pipe, x, t, neg, neg_mask)
    expected = (eps_c - eps_u).flatten(1).norm(dim=1)
    assert int(neg_mask.sum(1).max()) == 1  # only </s> of the empty prompt is attended
    torch.testing.assert_close(batch.guidance_norms[:, 0], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sampler.first_step_norms(PROMPTS, 2), expected, rtol=1e-4, atol=1e-6)
    # the family's unconditional is the pipeline's
    uncond = target.unconditional(1)
    torch.testing.assert_close(uncond.embeds, neg[:1])
    assert torch.equal(uncond.tensors["prompt_attention_mask"], neg_mask[:1])


# ------------------------------------------------------------------------------------------- eps, noise, training

def test_predict_eps_add_noise_and_training_target_follow_hand_formulas():
    from diffusers import DDPMScheduler

    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([999, 500, 10])
    cond = target.encode_prompts(["a photo of a cat", "a dog", ""])
    with torch.no_grad():
        eps = target.predict_eps(x, t, cond)
        hand = _hand_eps(pipe, x, t, cond.embeds, cond.tensors["prompt_attention_mask"])
    assert eps.shape == x.shape and float(eps.abs().max()) > 0
    torch.testing.assert_close(eps, hand, rtol=1e-5, atol=1e-6)

    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    a = pipe.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(target.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)  # training's noising (DPM-Solver's is img2img's)
    torch.testing.assert_close(target.add_noise(x0, noise, t), ddpm.add_noise(x0, noise, t))
    assert torch.equal(target.training_target(x0, noise, t), noise)  # epsilon prediction
    assert target.prediction_type == "epsilon" and target.scaling_factor == pytest.approx(0.13025)
    ts = target.sample_timesteps(64, torch.Generator().manual_seed(0))
    assert ts.dtype == torch.int64 and 0 <= int(ts.min()) and int(ts.max()) < 1000


def test_v_prediction_scheduler_converts_the_eps_half():
    pipe = _pipe()
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    target = from_pipeline(pipe, device="cpu")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 30])
    cond = target.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        v = _hand_eps(pipe, x, t, cond.embeds, cond.tensors["prompt_attention_mask"])
        raw = pipe.transformer(x, encoder_hidden_states=cond.embeds,
                               encoder_attention_mask=cond.tensors["prompt_attention_mask"], timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        eps = target.predict_eps(x, t, cond)
    a = pipe.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps, a.sqrt() * v + (1 - a).sqrt() * x, rtol=1e-5, atol=1e-6)
    # what the sampling hook sees is the raw (2C-channel) output: it converts the same half
    torch.testing.assert_close(target.to_eps(raw, x, t), eps, rtol=1e-5, atol=1e-6)


def _dataset(images: np.ndarray, captions):
    from memaudit.data import from_arrays

    return from_arrays(images, list(captions), names=[f"img{i}" for i in range(len(captions))])


def test_training_runs_and_lowers_the_loss_on_one_image():
    from memaudit.training import TrainConfig, train_unet

    rng = np.random.default_rng(0)
    target = from_pipeline(_pipe(), device="cpu")
    before = {k: v.clone() for k, v in target.denoiser.state_dict().items()}
    images = rng.random((4, RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    data = _dataset(images, [f"a photo of item {i}" for i in range(4)])
    cfg = dict(batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0, log_every=0)
    result = train_unet(target, data, TrainConfig(steps=5, **cfg), params=list(target.unet.parameters()))
    assert result.steps == 5 and all(np.isfinite(result.losses))
    after = target.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not target.denoiser.training and all(not p.requires_grad for p in target.denoiser.parameters())

    # one image repeated: the loss at a fixed (x0, t, noise) goes down after 20 steps
    target = from_pipeline(_pipe(), device="cpu")
    one = _dataset(np.repeat(images[:1], 2, axis=0), ["a photo of item 0"] * 2)
    x0 = target.encode_images(one.images[:1])[0]
    g = torch.Generator().manual_seed(5)
    noise, t = torch.randn(x0.shape, generator=g), torch.tensor([400])
    cond = target.encode_prompts(["a photo of item 0"])

    def fixed_loss():
        with torch.no_grad():
            out = target.denoise(target.add_noise(x0, noise, t), t, cond)
            return float((out - target.training_target(x0, noise, t)).pow(2).mean())

    first = fixed_loss()
    train_unet(target, one, TrainConfig(steps=20, **cfg), params=list(target.unet.parameters()))
    last = fixed_loss()
    assert last < 0.9 * first, (first, last)


# -------------------------------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("kind", ["sigma", "alpha"])
def test_load_target_round_trip_and_missing_component(kind, tmp_path):
    pipe = _pipe(kind)
    folder = tmp_path / kind
    pipe.save_pretrained(folder, safe_serialization=True)
    _, in_memory = _first_batch(from_pipeline(pipe, device="cpu"))
    loaded = load_target(folder, device="cpu")
    assert type(loaded.pipe).__name__ == type(pipe).__name__ and isinstance(loaded.family, PixArt)
    _, batch = _first_batch(loaded)
    assert float((batch.images - in_memory.images).abs().max()) <= 1e-6
    torch.testing.assert_close(batch.guidance_norms, in_memory.guidance_norms)

    if kind == "alpha":  # hub PixArt-Alpha folders name the transformer Transformer2DModel; diffusers remaps it
        index = json.loads((folder / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        (folder / "model_index.json").write_text(json.dumps(index))
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
        _, remapped = _first_batch(load_target(folder, device="cpu"))
        assert float((remapped.images - in_memory.images).abs().max()) <= 1e-6

    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(TargetError) as info:
        load_target(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message and "text_encoder" in message and type(pipe).__name__ in message


def test_wrong_component_class_is_refused(tmp_path):
    pipe = _pipe()
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TargetError, match="text_encoder is a CLIPTextModel"):
        load_target(tmp_path, device="cpu")


# ---------------------------------------------------------------------------------------------- PixArt specifics

def test_learned_sigma_channels_never_leak_into_eps():
    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([900, 100])
    cond = target.encode_prompts(PROMPTS)
    _, batch = _first_batch(target)
    with torch.no_grad():
        raw = pipe.transformer(x, encoder_hidden_states=cond.embeds,
                               encoder_attention_mask=cond.tensors["prompt_attention_mask"], timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        eps = target.predict_eps(x, t, cond)
        assert target.denoise(x, t, cond).shape == x.shape
    torch.testing.assert_close(eps, raw.chunk(2, dim=1)[0])  # the pipeline's chunk
    assert float(raw[:, 4:].abs().mean()) > 0.1  # the sigma half is not zero: leaking it would show

    # make the sigma half huge: eps, the guidance norms and the images do not change; the eps half would
    patch = pipe.transformer.config.patch_size
    rows = torch.arange(patch * patch * 8).reshape(patch * patch, 8)
    sigma_rows, eps_rows = rows[:, 4:].flatten(), rows[:, :4].flatten()
    proj = pipe.transformer.proj_out
    with torch.no_grad():
        proj.bias[sigma_rows] += 50.0
        proj.weight[sigma_rows] *= 20.0
        raw2 = pipe.transformer(x, encoder_hidden_states=cond.embeds,
                                encoder_attention_mask=cond.tensors["prompt_attention_mask"], timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        assert float((raw2[:, 4:] - raw[:, 4:]).abs().min()) > 1.0
        torch.testing.assert_close(target.predict_eps(x, t, cond), eps)
    _, again = _first_batch(target)
    torch.testing.assert_close(again.guidance_norms, batch.guidance_norms)
    assert torch.equal(again.images, batch.images)
    with torch.no_grad():
        proj.bias[eps_rows] += 1.0
        assert not torch.allclose(target.predict_eps(x, t, cond), eps)


def test_transformer_without_learned_sigma():
    pipe = _pipe(out_channels=4)
    target = from_pipeline(pipe, device="cpu")
    assert not target.family.learned_sigma(pipe)
    _, batch = _first_batch(target)
    ref = _plain(pipe, [p for p in PROMPTS for _ in range(2)], batch.seeds)
    assert float((batch.images - ref).abs().max()) <= 1e-5
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([800, 200])
    cond = target.encode_prompts(PROMPTS)
    with torch.no_grad():
        raw = pipe.transformer(x, encoder_hidden_states=cond.embeds,
                               encoder_attention_mask=cond.tensors["prompt_attention_mask"], timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        torch.testing.assert_close(target.predict_eps(x, t, cond), raw)
    # any other channel count is refused, as the pipeline could not use it
    with pytest.raises(TargetError, match="output channels"):
        from_pipeline(_pipe(out_channels=6), device="cpu")


def test_attention_mask_hides_the_padding():
    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    cond = target.encode_prompts(["a cat"])
    mask = cond.tensors["prompt_attention_mask"]
    assert mask.shape == (1, T5_MAX_LENGTH) and 0 < int(mask.sum()) < T5_MAX_LENGTH
    pad = mask[0] == 0
    changed = cond.embeds.clone()
    changed[0, pad] = torch.randn(int(pad.sum()), changed.shape[-1], generator=torch.Generator().manual_seed(4)) * 5
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([600])
    with torch.no_grad():
        eps = target.predict_eps(x, t, cond)
        torch.testing.assert_close(target.predict_eps(x, t, cond.replace(prompt_embeds=changed)), eps,
                                   rtol=0, atol=1e-6)
        # without the mask the padding would matter: the check above can fail
        unmasked = cond.replace(prompt_attention_mask=torch.ones_like(mask))
        assert not torch.allclose(target.predict_eps(x, t, unmasked.replace(prompt_embeds=changed)),
                                  target.predict_eps(x, t, unmasked), atol=1e-4)


def test_guidance_one_scores_with_the_unconditional_mask():
    """Without guidance the pipeline makes only conditional calls; the hook's extra unconditional call must pass the
    empty prompt's own mask (as the pipeline does for its negative prompt)."""
    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    sampler, batch = _first_batch(target, guidance=1.0)
    assert sampler.extra_calls == 4  # one batched call, counted per image
    torch.testing.assert_close(batch.guidance_norms[:, 0], sampler.first_step_norms(PROMPTS, 2), rtol=1e-4, atol=1e-6)
    assert torch.isnan(batch.guidance_norms[:, 1:]).all()
    ref = _plain(pipe, [p for p in PROMPTS for _ in range(2)], batch.seeds, guidance=1.0)
    assert float((batch.images - ref).abs().max()) <= 1e-5


def test_alpha_1024_models_get_resolution_micro_conditions():
    """PixArt-Alpha passes image size and aspect ratio to transformers of sample_size 128; PixArt-Sigma never does
    (so such a transformer cannot run in a Sigma pipeline)."""
    # the size embeddings take a third of the inner width each: 2 heads of 12
    pipe = _pipe("alpha", sample_size=128, use_additional_conditions=True, attention_head_dim=12,
                 cross_attention_dim=24)
    target = from_pipeline(pipe, device="cpu")
    family = target.family
    seeds = [11, 12]
    cond, uncond = target.encode_prompts(PROMPTS), target.unconditional(2)
    # the tiny model runs at 32 px (the default would be 256 px); binning is off, so any size works
    run = sample(family, pipe, cond, uncond, seeds, steps=STEPS, guidance=GUIDANCE, resolution=RESOLUTION)
    ref = _plain(pipe, PROMPTS, seeds)
    assert float((run.images - ref).abs().max()) <= 1e-5

    x, t = family.first_step(pipe, family.initial_latents(pipe, seeds, RESOLUTION), STEPS, RESOLUTION)
    added = {"resolution": torch.tensor([[32.0, 32.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        hand_c = _hand_eps(pipe, x, t, cond.embeds, cond.tensors["prompt_attention_mask"], added)
        hand_u = _hand_eps(pipe, x, t, uncond.embeds, uncond.tensors["prompt_attention_mask"], added)
        tt = torch.as_tensor(t).reshape(1).expand(2)
        torch.testing.assert_close(target.predict_eps(x, tt, cond), hand_c, rtol=1e-5, atol=1e-6)
        other = {"resolution": torch.tensor([[64.0, 32.0]] * 2), "aspect_ratio": torch.tensor([[2.0]] * 2)}
        assert not torch.allclose(_hand_eps(pipe, x, t, cond.embeds, cond.tensors["prompt_attention_mask"], other),
                                  hand_c, atol=1e-5)  # the micro-conditions matter
    torch.testing.assert_close(run.norms[:, 0], (hand_c - hand_u).flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)

    from diffusers import PixArtSigmaPipeline

    sigma = PixArtSigmaPipeline(**pipe.components)
    assert family_of(sigma) is family
    with pytest.raises(TargetError, match="aspect-ratio"):
        from_pipeline(sigma, device="cpu")


def test_blocks_and_components():
    pipe = _pipe()
    family = family_of(pipe)
    assert family_of(_pipe("alpha")) is family
    assert family.blocks(pipe.transformer) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert all(isinstance(pipe.transformer.get_submodule(b), torch.nn.Module) for b in family.blocks(pipe.transformer))
    assert set(family.components) == set(pipe.components)


def test_encoding_keeps_gradients():
    pipe = _pipe()
    target = from_pipeline(pipe, device="cpu")
    target.text_encoder.requires_grad_(True)
    cond = target.embed(["a cat"])
    assert cond.embeds.requires_grad
    cond.embeds.sum().backward()
    assert pipe.text_encoder.shared.weight.grad is not None
