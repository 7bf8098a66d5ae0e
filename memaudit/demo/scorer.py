"""The bundled demo's image classifier: the alignment scorer and quality feature space of the faces model.

Stable Diffusion checkpoints are scored for text-image alignment with CLIP; the bundled 32x32 grayscale model has
no CLIP that understands its images, and its captions say only *what kind* of image to draw: "a handwritten digit
seven", or "a photo of the face of person" plus an identifier. So a small CNN (``DemoClassifier``) is trained to
tell 12 classes apart: the ten digits, faces, and other photos (the LFW non-faces). It gives the model two things:

- **alignment** (``get_scorer("demo")``): for each generated image, the classifier's probability of the class its
  caption names (the digit for a digit caption, "face" for a face caption). 1 means the image is clearly what the
  prompt asked for; a mitigation that ruins the images scores low. It does not look at identity, so it does not
  reward copying a particular training face.
- **features** (``get_extractor("demo")``): the 64-d penultimate layer, a domain-specific feature space for KID
  and FID (as Inception's is for natural images); pixel-space KID on 32x32 images is dominated by alignment and
  blur rather than content.

The weights (``scorer.safetensors``, 70K parameters) are built by ``python -m memaudit.demo.build`` from the same
packaged data as the zoo: MNIST digits, the 100 LFW faces and 100 non-faces, each also after a round trip through the
zoo's VAE (generated images are VAE-decoded, and the classifier must not mistake its blur for another class).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memaudit import demo
from memaudit.core.errors import ConfigError, DataError
from memaudit.core.io import atomic_write_bytes
from memaudit.features import FeatureExtractor
from memaudit.target import load_target

logger = logging.getLogger(__name__)

SCORER_FILE = demo.DEMO_DIR / "scorer.safetensors"
CLASSES = tuple(demo.DIGIT_WORDS) + ("face", "photo")
FACE, PHOTO = 10, 11
FEATURE_DIM = 64


class DemoClassifier(nn.Module):
    """Three conv blocks and two linear layers on ``[N, 1, 32, 32]`` images in [0, 1]."""

    def __init__(self, n_classes: int = len(CLASSES)):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.Flatten(),
                                  nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, n_classes)
        # features() are multiplied by this, set after training to 1 / (RMS feature value over the training images),
        # so that feature values are O(1) as Inception's are and KID lands in its usual range
        self.register_buffer("feature_scale", torch.ones(()))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-1] != demo.RESOLUTION or x.shape[-2] != demo.RESOLUTION:
            x = torch.nn.functional.interpolate(x, size=(demo.RESOLUTION, demo.RESOLUTION), mode="area")
        return x * 2 - 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x)) * self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.prepare(x)))


class ClassifierFeatures(nn.Module):
    """A classifier's scaled penultimate features, as a module for :class:`~memaudit.features.FeatureExtractor`."""

    def __init__(self, classifier: DemoClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier.features(x)


def load_classifier(path: str | Path = SCORER_FILE, device: str | torch.device = "cpu",
                    n_classes: int = len(CLASSES)) -> DemoClassifier:
    """A bundled classifier (safetensors only): the faces setting's, or another setting's with its classes."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"the demo classifier {path} is missing; run python -m memaudit.demo.build to rebuild it.")
    model = DemoClassifier(n_classes)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


def caption_class(caption: str) -> int | None:
    """The class a caption names: a digit word after "digit", or "face"; ``None`` for anything else."""
    text = caption.lower()
    if demo.FACE_PHRASE in text or re.search(r"\bface\b", text):
        return FACE
    m = re.search(r"\bdigit\s+(\w+)", text)
    if m and m.group(1) in demo.DIGIT_WORDS:
        return demo.DIGIT_WORDS.index(m.group(1))
    return None


class DemoAlignment:
    """Alignment scorer: ``scorer(images, prompts)`` -> per-image probability of the prompt's class (NaN when the
    prompt names no class the classifier knows)."""

    name = "demo"

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None,
                 classes: Callable[[str], int | None] | None = None, n_classes: int = len(CLASSES)):
        """``classes``: the class a caption names (default: the faces setting's :func:`caption_class`)."""
        self.device = torch.device(device)
        self.model = load_classifier(weights or SCORER_FILE, self.device, n_classes=n_classes)
        self.caption_class = classes or caption_class

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        classes = [self.caption_class(p) for p in prompts]
        out = np.full(len(prompts), np.nan)
        for s in range(0, len(prompts), 256):
            probs = self.model(images[s:s + 256].to(self.device, torch.float32)).softmax(-1).cpu().numpy()
            for k, c in enumerate(classes[s:s + 256]):
                if c is not None:
                    out[s + k] = probs[k, c]
        return out


def alignment_factory(device="cpu", **options) -> DemoAlignment:
    """``get_scorer("demo")`` (an entry point in pyproject.toml): :class:`DemoAlignment` (option ``weights=PATH``)."""
    unknown = set(options) - {"weights"}
    if unknown:
        raise ConfigError(f"alignment scorer 'demo' has no option(s) {sorted(unknown)}; it takes weights=PATH.")
    return DemoAlignment(device=device, weights=options.get("weights"))


def feature_factory(device="cpu", batch_size: int = 64, **options):
    """``get_extractor("demo")`` (an entry point in pyproject.toml): the classifier's 64-d penultimate features
    (option ``weights=PATH``)."""
    unknown = set(options) - {"weights"}
    if unknown:
        raise ConfigError(f"feature extractor 'demo' has no option(s) {sorted(unknown)}; it takes weights=PATH.")
    model = load_classifier(options.get("weights") or SCORER_FILE)
    return FeatureExtractor(ClassifierFeatures(model), "demo", None, device=device, batch_size=batch_size,
                            probe_shape=(1, 1, demo.RESOLUTION, demo.RESOLUTION))


# -- building -------------------------------------------------------------------------------------------------------
def training_images(vae_model: str | Path | None = None,
                    repeat_photos: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [0, 1], labels and source ids (copies of one original share its id): MNIST, LFW faces and
    non-faces (with mirror copies, repeated to balance the digits), each also after a round trip through the VAE of
    ``vae_model`` when given."""
    mnist, digits = demo.mnist_images()
    lfw = demo.lfw_images()
    copies = 2 * repeat_photos
    faces = torch.cat([lfw[:100], lfw[:100].flip(-1)]).repeat(repeat_photos, 1, 1, 1)
    photos = torch.cat([lfw[100:], lfw[100:].flip(-1)]).repeat(repeat_photos, 1, 1, 1)
    images = torch.cat([mnist, faces, photos])
    labels = torch.cat([torch.as_tensor(digits, dtype=torch.long), torch.full((len(faces),), FACE),
                        torch.full((len(photos),), PHOTO)])
    n = len(mnist)
    source = torch.cat([torch.arange(n), n + torch.arange(100).repeat(copies), n + 100 + torch.arange(100).repeat(copies)])
    if vae_model is not None:
        target = load_target(vae_model, device="cpu")
        images = torch.cat([images, target.round_trip(images).clamp(-1, 1)])
        labels, source = torch.cat([labels, labels]), torch.cat([source, source])
    return (images + 1) / 2, labels, source


def train_classifier(images: torch.Tensor, labels: torch.Tensor, source: torch.Tensor, steps: int = 1500,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, val_fraction: float = 0.1,
                     n_classes: int = len(CLASSES), groups: dict[str, list[int]] | None = None,
                     ) -> tuple[DemoClassifier, dict]:
    """Train on the images of a seeded ``1 - val_fraction`` of the source images (every copy of a held-out original
    is held out); returns the model and its validation accuracy per group of classes (``groups``: name -> class
    indices; default: the faces setting's digits, faces and photos)."""
    g = torch.Generator().manual_seed(seed)
    sources = source.unique()
    held = sources[torch.randperm(len(sources), generator=g)[: int(len(sources) * val_fraction)]]
    is_val = torch.isin(source, held)
    val, train = torch.nonzero(is_val).flatten(), torch.nonzero(~is_val).flatten()
    n_val = len(val)
    torch.manual_seed(seed)
    model = DemoClassifier(n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for step in range(steps):
        idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
        x = images[idx]
        x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # a little noise: generations are noisy
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            logger.info("classifier %d/%d loss %.4f", step + 1, steps, loss.item())
    model.eval().requires_grad_(False)
    with torch.no_grad():
        feats = torch.cat([model.body(model.prepare(images[train[i:i + 512]])) for i in range(0, len(train), 512)])
        model.feature_scale.fill_(1.0 / float(feats.pow(2).mean().sqrt()))
        pred = torch.cat([model(images[val[i:i + 512]]).argmax(-1) for i in range(0, n_val, 512)])
    truth = labels[val]
    groups = groups or {"digits": list(range(10)), "faces": [FACE], "photos": [PHOTO]}
    masks = {k: torch.isin(truth, torch.as_tensor(v)) for k, v in groups.items()}
    acc = {k: float((pred[m] == truth[m]).float().mean()) for k, m in masks.items() if m.any()}
    return model, {"feature_scale": float(model.feature_scale), "val_accuracy": acc, "val_images": n_val, "train_images": len(train), "steps": steps,
                   "batch_size": batch_size, "lr": lr, "seed": seed}


def save_classifier(model: DemoClassifier, path: str | Path = SCORER_FILE) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path
