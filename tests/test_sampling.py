"""The sampler: same images as plain diffusers, batch-invariant, 2 UNet evaluations per image per step, and
guidance norms equal to an independent computation from plain UNet calls."""

from __future__ import annotations

import pytest
import torch

from memaudit.sampling import Sampler, image_seed
from memaudit.target import load_target

PROMPTS = ["a photo of a cat", "a painting of a dog"]


@pytest.fixture(scope="module", params=["eps", "v"])
def target(request, tiny_dir_eps, tiny_dir_v):
    return load_target(tiny_dir_eps if request.param == "eps" else tiny_dir_v, device="cpu")


def _collect(sampler, prompts, generations):
    batches = list(sampler.run(prompts, generations))
    return (torch.cat([b.images for b in batches]), torch.cat([b.guidance_norms for b in batches]),
            sum((b.seeds for b in batches), []), batches)


def test_same_images_as_plain_diffusers(target):
    images, _, seeds, _ = _collect(Sampler(target, steps=3, guidance=3.0, batch_size=3, seed=0), PROMPTS, 2)
    pipe = target.pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=[p for p in PROMPTS for _ in range(2)], num_inference_steps=3, guidance_scale=3.0,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt").images
    assert images.shape == ref.shape == (4, 3, 16, 16)
    assert torch.allclose(images, ref.float(), atol=1e-4)


def test_batch_invariant_and_seeded(target):
    a, na, seeds, _ = _collect(Sampler(target, steps=3, guidance=3.0, batch_size=4, seed=5), PROMPTS, 2)
    b, nb, _, _ = _collect(Sampler(target, steps=3, guidance=3.0, batch_size=1, seed=5), PROMPTS, 2)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(na, nb, atol=1e-4)
    assert seeds == [image_seed(5, i, j) for i in range(2) for j in range(2)]
    c, _, _, _ = _collect(Sampler(target, steps=3, guidance=3.0, batch_size=4, seed=6), PROMPTS, 2)
    assert not torch.allclose(a, c, atol=1e-3)


def test_two_unet_evaluations_per_image_per_step(target):
    calls, rows = [], []
    original = target.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(1)
        rows.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    target.unet.forward = counting
    try:
        steps, gens = 4, 3
        batches = list(Sampler(target, steps=steps, guidance=2.0, batch_size=4, seed=0).run(PROMPTS, gens))
    finally:
        del target.unet.forward
    n_images = len(PROMPTS) * gens
    assert len(calls) == steps * len(batches)  # one call per step per batch (conditional + unconditional together)
    assert sum(rows) == 2 * n_images * steps  # exactly two evaluations per image per step


def test_guidance_norms_equal_independent_computation(target):
    """Replay the denoising loop with separate plain UNet calls and compare ||eps_c - eps_u|| at every step."""
    steps, guidance = 3, 3.0
    _, norms, seeds, _ = _collect(Sampler(target, steps=steps, guidance=guidance, batch_size=4, seed=1), PROMPTS, 1)
    sched = type(target.scheduler).from_config(target.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.stack([torch.randn(target.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x * sched.init_noise_sigma
    tok = target.tokenizer(PROMPTS + ["", ""], padding="max_length", max_length=target.tokenizer.model_max_length,
                           return_tensors="pt")
    with torch.no_grad():
        emb = target.text_encoder(tok.input_ids)[0]
        emb_c, emb_u = emb[:2], emb[2:]
        expected = torch.empty(2, steps)
        acp = sched.alphas_cumprod
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t)
            out_c = target.unet(xin, t, encoder_hidden_states=emb_c).sample
            out_u = target.unet(xin, t, encoder_hidden_states=emb_u).sample
            a = acp[t]
            if target.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1-a) x_t
                eps_c, eps_u = a.sqrt() * out_c + (1 - a).sqrt() * xin, a.sqrt() * out_u + (1 - a).sqrt() * xin
            else:
                eps_c, eps_u = out_c, out_u
            expected[:, i] = (eps_c - eps_u).flatten(1).norm(dim=1)
            x = sched.step(out_u + guidance * (out_c - out_u), t, x).prev_sample
    assert torch.allclose(norms, expected, rtol=1e-4, atol=1e-6)


def test_bad_settings(target):
    from memaudit.core.errors import ConfigError

    with pytest.raises(ConfigError):
        Sampler(target, steps=0)
    with pytest.raises(ConfigError):
        list(Sampler(target, steps=2).run([], 2))
    with pytest.raises(ConfigError):
        list(Sampler(target, steps=2).run(PROMPTS, 0))


def test_first_step_norms_equal_the_first_step_of_sampling(target):
    prompts = ["a photo of item 1", "a photo of item 2"]
    s = Sampler(target, steps=3, guidance=4.0, batch_size=3, seed=5)
    full = torch.cat([b.guidance_norms[:, 0] for b in s.run(prompts, 2)])
    torch.testing.assert_close(s.first_step_norms(prompts, 2), full, rtol=1e-5, atol=1e-6)


def test_prompt_transform_sees_each_image_seed(target):
    seen = []
    s = Sampler(target, steps=1, batch_size=2, seed=3, prompt_transform=lambda p, seed: seen.append((p, seed)) or p + "!")
    batches = list(s.run(["a", "b"], 2))
    assert seen == [(p, image_seed(3, i, j)) for i, p in enumerate("ab") for j in range(2)]
    assert [q for b in batches for q in b.prompts] == ["a!", "a!", "b!", "b!"]
