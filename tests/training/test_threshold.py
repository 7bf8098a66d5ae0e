"""Threshold mitigation at training time: exactly the samples at or above the threshold leave the loss."""

from __future__ import annotations

import pytest
import torch

from memaudit.baselines.threshold import ThresholdHook, batch_strength
from memaudit.core.errors import ConfigError
from memaudit.target import load_target
from memaudit.training import LossContext, TrainConfig, TrainHook, train_unet


def _ctx(n):
    z = torch.zeros(n, 4, 8, 8)
    return LossContext(batch=None, noise=z, timesteps=torch.zeros(n, dtype=torch.long), noisy=z, embeddings=None,
                       output=z, per_sample_loss=torch.zeros(n))


class _State:
    def __init__(self):
        self.stats = {}


def test_drops_exactly_the_planted_norms_over_the_threshold():
    planted = torch.tensor([0.1, 0.5, 0.49, 2.0, 0.5, 0.0])
    hook = ThresholdHook(threshold=0.5, strength=lambda ctx, state: planted)
    state = _State()
    w = hook.sample_weights(_ctx(6), state)
    assert w.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]  # at or above 0.5 dropped
    assert state.stats == {"threshold_seen": 6, "threshold_dropped": 3}


def test_auto_drops_the_top_decile():
    planted = torch.arange(20, dtype=torch.float32)  # 90th percentile 17.1: 18 and 19 dropped
    hook = ThresholdHook("auto", strength=lambda ctx, state: planted)
    w = hook.sample_weights(_ctx(20), _State())
    assert w[:18].eq(1).all() and w[18:].eq(0).all()


def test_bad_settings():
    with pytest.raises(ConfigError):
        ThresholdHook("sometimes")
    with pytest.raises(ConfigError):
        ThresholdHook(-1.0)
    with pytest.raises(ConfigError):
        ThresholdHook("auto", quantile=1.0)


class _Compare(TrainHook):
    """Inside the training step: the hook's strength next to an independent computation from plain UNet calls."""

    def __init__(self):
        self.got = self.expected = None

    def sample_weights(self, ctx, state):
        target = state.target
        self.got = batch_strength(ctx, state)
        with torch.no_grad():
            t, x = ctx.timesteps, ctx.noisy
            v_c = target.unet(x, t, encoder_hidden_states=target.encode_prompts(list(ctx.batch.captions)).embeds).sample
            v_u = target.unet(x, t, encoder_hidden_states=target.unconditional(len(t)).embeds).sample
            a = target.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        self.expected = (a.sqrt() * (v_c - v_u)).flatten(1).norm(dim=1)  # v-prediction: eps_c - eps_u = sqrt(a)(v_c - v_u)
        return None


def test_strength_equals_plain_unet_calls_and_all_dropped_skips(tiny_dir_v, make_dataset):
    target = load_target(tiny_dir_v, device="cpu")
    data = make_dataset(n=4)
    cmp = _Compare()
    train_unet(target, data, TrainConfig(steps=1, batch_size=4, caption_dropout=0.0, seed=0), hooks=[cmp])
    assert torch.allclose(cmp.got, cmp.expected, rtol=1e-3, atol=1e-6)

    fresh = load_target(tiny_dir_v, device="cpu")
    before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    res = train_unet(fresh, data, TrainConfig(steps=2, batch_size=4, seed=0),
                     hooks=[ThresholdHook(1e-9)])  # every sample is at or above: all dropped, every step skipped
    assert res.skipped_steps == 2 and res.stats["threshold_dropped"] == 8
    assert all(torch.equal(before[k], v) for k, v in fresh.unet.state_dict().items())


def test_inference_time_optimization_lowers_the_norm(tiny_dir_eps):
    from memaudit.baselines.threshold import mitigate_embeddings

    target = load_target(tiny_dir_eps, device="cpu")
    cond = target.encode_prompts(["a photo of a cat", "a painting of a dog"])
    x = torch.randn(2, *target.latent_shape, generator=torch.Generator().manual_seed(0))
    t = target.scheduler.timesteps[0] if len(target.scheduler.timesteps) else torch.tensor(999)
    _, before, _, _ = mitigate_embeddings(target, cond, x, t, norm_target=1e9)  # already under: nothing to do
    emb, before2, after, steps = mitigate_embeddings(target, cond, x, t, norm_target=float(before.min()) * 0.5,
                                                     lr=0.05, max_steps=10)
    assert torch.equal(before, before2) and 1 <= steps <= 10
    assert (after < before).all()
    assert not torch.equal(emb.embeds, cond.embeds)
    same, _, _, zero_steps = mitigate_embeddings(target, cond, x, t, norm_target=float(before.max()) * 2)
    assert zero_steps == 0 and torch.equal(same.embeds, cond.embeds)
    with pytest.raises(ConfigError):
        mitigate_embeddings(target, cond, x, t, norm_target=0.0)


def test_sampler_with_embedding_mitigation_samples_with_the_optimized_embeddings(tiny_dir_eps):
    from memaudit.baselines.threshold import EmbeddingMitigation
    from memaudit.sampling import Sampler

    target = load_target(tiny_dir_eps, device="cpu")
    prompts = ["a photo of a cat", "a painting of a dog"]
    plain = list(Sampler(target, steps=3, guidance=3.0, batch_size=4, seed=0).run(prompts, 2))
    first_plain = torch.cat([b.guidance_norms[:, 0] for b in plain])
    hook = EmbeddingMitigation(target, norm_target=float(first_plain.min()) * 0.5, max_steps=10)
    mitigated = list(Sampler(target, steps=3, guidance=3.0, batch_size=4, seed=0, embedding_hook=hook).run(prompts, 2))
    first_mitigated = torch.cat([b.guidance_norms[:, 0] for b in mitigated])
    assert torch.allclose(torch.cat(hook.before), first_plain, rtol=1e-4)
    assert torch.allclose(torch.cat(hook.after), first_mitigated, rtol=1e-4)  # sampling used the optimized embeddings
    assert (first_mitigated < first_plain).all()
