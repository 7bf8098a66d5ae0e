"""Alignment scorers and the bundled demo classifier: known images get the answer they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.metrics.alignment import alignment_score, available_scorers, get_scorer, register_scorer


def test_caption_classes():
    from memaudit.demo import scorer

    assert scorer.caption_class("a handwritten digit seven") == 7
    assert scorer.caption_class("a photo of the face of person six two four") == scorer.FACE
    assert scorer.caption_class("a photo of a cat") is None


def test_demo_classifier_knows_digits_faces_and_noise():
    from memaudit import demo

    mnist, labels = demo.mnist_images()
    faces = demo.lfw_images()[:100]
    digit_prompts = [demo.digit_caption(int(d)) for d in labels[:200]]
    digit_score, per = alignment_score((mnist[:200] + 1) / 2, digit_prompts, "demo")
    assert digit_score > 0.9 and per.shape == (200,)
    face_score, _ = alignment_score((faces + 1) / 2, [demo.FACE_PHRASE + " one"] * 100, "demo")
    assert face_score > 0.9
    # a digit asked for, a face drawn: misaligned
    wrong, _ = alignment_score((faces[:50] + 1) / 2, ["a handwritten digit three"] * 50, "demo")
    assert wrong < 0.1
    # a prompt the classifier cannot judge gives NaN and is left out of the mean
    _, per = alignment_score((faces[:2] + 1) / 2, ["a photo of a cat", demo.FACE_PHRASE], "demo")
    assert np.isnan(per[0]) and not np.isnan(per[1])


def test_demo_features_are_64_dimensional():
    from memaudit.features import get_extractor

    ext = get_extractor("demo")
    assert ext(torch.rand(3, 1, 32, 32)).shape == (3, 64)


def test_registry_errors():
    assert "demo" in available_scorers()
    with pytest.raises(ConfigError, match="does not exist"):
        get_scorer("no-such-scorer")
    with pytest.raises(ConfigError, match="already registered"):
        register_scorer("demo", lambda device="cpu": None)
    with pytest.raises(ConfigError, match="one prompt per image"):
        get_scorer(lambda im, pr: np.zeros(len(pr)))(torch.zeros(2, 1, 4, 4), ["a"])
    with pytest.raises(ConfigError, match="returned 1 scores"):
        get_scorer(lambda im, pr: np.zeros(1))(torch.zeros(2, 1, 4, 4), ["a", "b"])
