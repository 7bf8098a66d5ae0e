"""The bundled fashion setting: its models load in plain diffusers, the base draws the domain without copying the
products, and the full fine-tune copies the products it saw many times more than those it saw once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.demo import fashion
from memaudit.demo.check import reproduction_check
from memaudit.demo.fashion_scorer import alignment_factory, feature_factory

# the bundled models end to end: CI runs it; `pytest -m 'not slow'` leaves it out
pytestmark = pytest.mark.slow


def products_of(copies: int, n: int) -> tuple[list[str], list[int]]:
    p = fashion.read_products()
    rows = np.flatnonzero(p["copies"] == copies)[:n]
    return [str(c) for c in p["caption"][rows]], rows.tolist()


def references() -> torch.Tensor:
    return fashion.to_model(fashion.read_products()["images"]) * 2 - 1


def test_bundled_products_are_the_recipe():
    p = fashion.read_products()
    assert p["images"].shape == (fashion.PER_LEVEL * len(fashion.COPIES) + fashion.N_HELDOUT, 28, 28)
    assert p["images"].dtype == np.uint8
    assert sorted(set(p["copies"][p["split"] == "train"].tolist())) == list(fashion.COPIES)
    assert len(set(p["caption"].tolist())) == len(p["caption"])


@pytest.mark.parametrize("model, copies, at_least, at_most", [("full_ft", 32, 8, 10), ("full_ft", 4, 2, 7),
                                                               ("full_ft", 1, 0, 1), ("base", 32, 0, 0)])
def test_memorization_follows_duplication(model, copies, at_least, at_most):
    """The full fine-tune reproduces the products it saw 32 times (10 of these 10 with 2 generations each, here),
    some of those it saw 4 times (4 of 10) and none it saw once; the base none (RESULTS.md section 16)."""
    captions, own = products_of(copies, 10)
    res, images, _ = reproduction_check(str(fashion.FASHION_DIR / model), captions, own, references(),
                                        generations=2, steps=25, guidance=4.0, seed=0)
    assert images.shape == (20, 1, 32, 32)
    assert at_least <= res.reproduced_faces <= at_most


def test_base_draws_the_class_it_is_asked_for():
    """The base draws the domain: the classifier (trained on the base's data, never on a product) recognizes the
    class of most of its generations for held-out captions, and far fewer for noise."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(fashion.FASHION_DIR / "base")
    pipe.set_progress_bar_config(disable=True)
    captions = [fashion.caption(label, 500 + label) for label in range(10)]
    out = pipe(captions, num_inference_steps=25, guidance_scale=4.0, output_type="pt",
               generator=[torch.Generator().manual_seed(k) for k in range(10)])
    scorer = alignment_factory()
    drawn = scorer(out.images, captions)
    noise = scorer(torch.rand(10, 1, 32, 32), captions)
    assert np.mean(drawn) > 0.6 > np.mean(noise) + 0.3
    assert feature_factory()(out.images).shape == (10, 64)
