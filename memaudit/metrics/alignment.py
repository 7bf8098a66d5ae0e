"""Text-image alignment: does a generated image show what its prompt asked for?

A scorer maps images ``[N, C, H, W]`` in [0, 1] and their prompts to one score per image (higher is better aligned;
NaN where the scorer cannot judge a prompt). Which scorer fits depends on the domain, so scorers are pluggable:
:func:`register_scorer` a factory under a name, or pass any callable ``scorer(images, prompts) -> array``.

Built in:

``demo`` (declared as an entry point of memaudit, :mod:`memaudit.core.plugins`)
    For the bundled faces model: the probability, under the bundled classifier, of the class the caption names (a
    digit, or a face); see :mod:`memaudit.demo.scorer` for why a classifier stands in for CLIP there.

For Stable Diffusion checkpoints the usual choice is a CLIP score with the user's own CLIP weights (or a domain
model, e.g. a radiology image-text model for chest X-rays), registered the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memaudit.core import plugins
from memaudit.core.errors import ConfigError

Scorer = Callable[[torch.Tensor, list[str]], np.ndarray]
_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, factory: Callable[..., Scorer]) -> None:
    """Make ``factory(device=..., **options) -> scorer`` available as ``get_scorer(name)``."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"alignment scorer name must be a non-empty string (got {name!r}).")
    if name in _REGISTRY or name in plugins.names(plugins.ALIGNMENT_SCORERS):  # a plugin not loaded yet counts too
        raise ConfigError(f"alignment scorer {name!r} is already registered; choose another name.")
    _REGISTRY[name] = factory


def available_scorers() -> list[str]:
    """Registered scorers, then those installed packages declare as entry points (the bundled demo's ``demo``)."""
    return plugins.names_beside(_REGISTRY, plugins.ALIGNMENT_SCORERS)


@dataclass
class NamedScorer:
    name: str
    fn: Scorer

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ConfigError(f"alignment: {len(images)} images but {len(prompts)} prompts; pass one prompt per image.")
        out = np.asarray(self.fn(images, list(prompts)), dtype=np.float64).reshape(-1)
        if len(out) != len(prompts):
            raise ConfigError(f"alignment scorer {self.name!r} returned {len(out)} scores for {len(prompts)} images.")
        return out


def get_scorer(scorer: str | Scorer, device: str | torch.device = "cpu", **options) -> NamedScorer:
    """A scorer by registered name, or a callable wrapped as it is."""
    if isinstance(scorer, NamedScorer):
        return scorer
    if callable(scorer) and not isinstance(scorer, str):
        return NamedScorer(getattr(scorer, "name", type(scorer).__name__), scorer)
    factory = plugins.resolve(_REGISTRY, plugins.ALIGNMENT_SCORERS, scorer)
    if factory is None:
        raise ConfigError(f"alignment scorer {scorer!r} does not exist; choose one of: {', '.join(available_scorers())} "
                          "(or register your own with memaudit.metrics.alignment.register_scorer).")
    return NamedScorer(scorer, factory(device=device, **options))


def alignment_score(images: torch.Tensor, prompts: Sequence[str], scorer: str | Scorer = "demo",
                    device: str | torch.device = "cpu") -> tuple[float, np.ndarray]:
    """Mean alignment over the images the scorer can judge, and the per-image scores."""
    per_image = get_scorer(scorer, device=device)(images, prompts)
    judged = per_image[~np.isnan(per_image)]
    return (float(judged.mean()) if len(judged) else float("nan")), per_image

