"""Denoising strength: per-prompt scores, the training-time variant and token attribution, against hand values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.attacks.denoising import image_scores, prompt_scores, token_attribution, training_strength
from memaudit.core.errors import ConfigError
from memaudit.target import load_target


@pytest.fixture(scope="module")
def target(tiny_dir_v):
    return load_target(tiny_dir_v, device="cpu")


def test_prompt_scores_hand_values():
    norms = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [10.0, 10.0, 10.0]])
    idx = torch.tensor([0, 0, 1])
    assert prompt_scores(norms, idx, 2).tolist() == pytest.approx([3.0, 10.0])
    assert prompt_scores(norms, idx, 2, window=(0, 1)).tolist() == pytest.approx([2.0, 10.0])
    gen = torch.tensor([0, 1, 0])
    assert prompt_scores(norms, idx, 2, generation=gen, max_generations=1).tolist() == pytest.approx([2.0, 10.0])
    with pytest.raises(ConfigError):
        prompt_scores(norms, idx, 2, window=(2, 1))


def test_image_scores_over_the_scored_window():
    """Flux's norms: scored at the first step only, NaN after; a black box's: NaN everywhere."""
    nan = float("nan")
    flux = np.array([[1.0, nan, nan], [2.0, nan, nan]], dtype=np.float32)
    assert image_scores(flux, (0, 1)).tolist() == [1.0, 2.0]
    assert image_scores(flux).tolist() == [1.0, 2.0]  # unscored steps are left out, not averaged as NaN
    assert np.isnan(torch.from_numpy(flux).mean(1).numpy()).all()  # what a plain mean gives
    norms = torch.tensor([[1.0, 2.0, 6.0], [2.0, 4.0, nan], [nan, nan, nan]])
    assert image_scores(norms, (0, None)).tolist()[:2] == pytest.approx([3.0, 3.0])
    assert image_scores(norms, (1, 3)).tolist()[:2] == pytest.approx([4.0, 4.0])
    assert image_scores(norms, (2, None))[0] == pytest.approx(6.0) and np.isnan(image_scores(norms, (2, None))[1])
    assert np.isnan(image_scores(norms)[2])  # a black box's image has no score
    idx = torch.tensor([0, 0, 1])  # the per-prompt score is the mean of the per-image ones
    assert prompt_scores(norms, idx, 2, window=(1, 3))[0] == pytest.approx(image_scores(norms, (1, 3))[:2].mean())
    with pytest.raises(ConfigError):
        image_scores(norms, (0, 4))


def test_training_strength_equals_plain_unet_calls(target):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, *target.latent_shape, generator=g)
    t = torch.tensor([10, 500, 900])
    caps = ["a cat", "a dog", "a tree"]
    got = training_strength(target, x0, caps, timesteps=t, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    a = target.scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    tok = target.tokenizer(caps + [""] * 3, padding="max_length", max_length=target.tokenizer.model_max_length,
                           return_tensors="pt")
    with torch.no_grad():
        emb = target.text_encoder(tok.input_ids)[0]
        v_c = target.unet(x_t, t, encoder_hidden_states=emb[:3]).sample
        v_u = target.unet(x_t, t, encoder_hidden_states=emb[3:]).sample
    expected = (a.sqrt() * (v_c - v_u)).flatten(1).norm(dim=1)  # v-prediction: eps_c - eps_u = sqrt(a) (v_c - v_u)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_token_attribution_shares(target):
    shares = token_attribution(target, "a photo of a cat")
    assert [t for t, _ in shares] == ["a", "photo", "of", "a", "cat"]
    assert sum(s for _, s in shares) == pytest.approx(1.0)
    assert all(s > 0 for _, s in shares)
    assert target.text_encoder.get_input_embeddings().weight.grad is None
