"""The fashion setting's classifier: its alignment scorer and quality feature space (``fashion``), as the faces
setting has ``demo`` (:mod:`memaudit.demo.scorer`, the same small CNN).

It tells the ten Fashion-MNIST classes apart. **Alignment** (``get_scorer("fashion")``) is its probability of the
class a caption names ("a photo of a sneaker, product ..."); it does not look at the product, so copying a
training product earns nothing. **Features** (``get_extractor("fashion")``) are its 64-d penultimate layer, for KID
and FID. It is trained on Fashion-MNIST's *training* split (the base model's data), each image also after a round
trip through the setting's VAE, and never sees a fine-tune or held-out product (those come from the test split).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from memaudit.core.errors import ConfigError
from memaudit.demo import fashion
from memaudit.demo.scorer import ClassifierFeatures, DemoAlignment, DemoClassifier, load_classifier, train_classifier
from memaudit.features import FeatureExtractor
from memaudit.target import load_target

SCORER_FILE = fashion.FASHION_DIR / "scorer.safetensors"
N_CLASSES = len(fashion.CLASS_WORDS)
_CLASS_RE = re.compile(r"\bphoto of an? (" + "|".join(re.escape(w) for w in fashion.CLASS_WORDS) + r")\b")


def caption_class(caption: str) -> int | None:
    """The class a caption names ("a photo of a sneaker, ..." -> 7); ``None`` when it names none."""
    m = _CLASS_RE.search(caption.lower())
    return fashion.CLASS_WORDS.index(m.group(1)) if m else None


def _weights(name: str, options: dict) -> Path:
    unknown = set(options) - {"weights"}
    if unknown:
        raise ConfigError(f"{name} 'fashion' has no option(s) {sorted(unknown)}; it takes weights=PATH.")
    return Path(options.get("weights") or SCORER_FILE)


def alignment_factory(device="cpu", **options) -> DemoAlignment:
    """``get_scorer("fashion")`` (an entry point in pyproject.toml), option ``weights=PATH``: per image, the
    probability of the class its prompt names (NaN when it names none)."""
    scorer = DemoAlignment(device=device, weights=_weights("alignment scorer", options), classes=caption_class,
                           n_classes=N_CLASSES)
    scorer.name = "fashion"
    return scorer


def feature_factory(device="cpu", batch_size: int = 64, **options):
    """``get_extractor("fashion")`` (an entry point in pyproject.toml): the 64-d penultimate features."""
    model = load_classifier(_weights("feature extractor", options), n_classes=N_CLASSES)
    return FeatureExtractor(ClassifierFeatures(model), "fashion", None, device=device, batch_size=batch_size,
                            probe_shape=(1, 1, 32, 32))


def train_fashion_classifier(images: np.ndarray, labels: np.ndarray, vae_model: str | Path | None, seed: int = 0,
                             steps: int = 3000) -> tuple[DemoClassifier, dict]:
    """Train on Fashion-MNIST's training split (uint8 ``[N, 28, 28]``), each image also after a round trip through
    the VAE of ``vae_model`` (generations are VAE-decoded; the classifier must not mistake its blur for a class)."""
    x = fashion.to_model(images) * 2 - 1
    y = torch.as_tensor(labels, dtype=torch.long)
    source = torch.arange(len(x))
    if vae_model is not None:
        target = load_target(vae_model, device="cpu")
        trip = torch.cat([target.round_trip(x[i:i + 1024]).clamp(-1, 1) for i in range(0, len(x), 1024)])
        x, y, source = torch.cat([x, trip]), torch.cat([y, y]), torch.cat([source, source])
    groups = {word: [k] for k, word in enumerate(fashion.CLASS_WORDS)}
    return train_classifier((x + 1) / 2, y, source, steps=steps, seed=seed, n_classes=N_CLASSES, groups=groups)
