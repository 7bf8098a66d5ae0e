"""Ren et al., ECCV 2024, "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models through Cross
Attention" (code: ``renjie3/MemAttn``, ``detect.py`` mode ``E``): memorized prompts spread the cross-attention over
their tokens instead of concentrating it on the start token. The score is the entropy ``E = -sum_i a_i log a_i`` of
the attention distribution over the text tokens (all of them, start, end and padding included), where ``a`` is the
conditional branch's attention probability averaged over the query positions and the heads (the mean taken before
the entropy, as theirs), at the first sampling step, in one layer: the fourth cross-attention layer in forward order
(their layer index 3, ``down_blocks.1.attentions.1`` of SD 1.x). Higher entropy is more memorized, as in the paper.

Cost: no extra denoiser call; the probabilities of that one layer are computed beside the model's own attention at
the first step. Differences: a denoiser with fewer than four cross-attention layers (the tiny test models) takes its
last one; ``0 log 0 = 0`` (masked padding of a T5 encoder, PixArt). Not for SD3 and Flux: their text attention is
joint (see :meth:`~memaudit.families.base.Family.cross_attention_layers`). Their mode ``D`` (the last ten steps,
every layer, plus the padding tokens' entropy change) is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memaudit.detectors.base import Detector
from memaudit.detectors.bright_ending import ATTENTION_FAMILIES
from memaudit.families.base import Family
from memaudit.families.pipeline import StepView

__all__ = ["MemAttn", "attention_entropy"]

#: their layer index (SD 1.x: down_blocks.1.attentions.1)
LAYER = 3


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``[B]``: the entropy of ``[B, queries, keys]`` attention probabilities averaged over the queries."""
    a = probs.float().mean(1)
    return -torch.xlogy(a, a).sum(-1)


class MemAttn(Detector):
    name = "memattn"
    summary = "entropy over the text tokens of one cross-attention layer's attention at the first step"
    source = "Ren et al., ECCV 2024, attention entropy, detection mode E (first step, layer 3)"
    families = ATTENTION_FAMILIES
    attention_steps = ("first",)

    @classmethod
    def attention_layers(cls, family: Family, denoiser: torch.nn.Module) -> list[str]:
        layers = family.cross_attention_layers(denoiser)
        return layers[min(LAYER, len(layers) - 1):][:1]

    def __init__(self, n: int, tokens: torch.Tensor | None = None, layers: Sequence[str] = ()):
        super().__init__(n, tokens, layers)
        self.score = self.nan()

    def step(self, view: StepView) -> None:
        attention = self.attention(view)
        if view.step == 0 and attention:
            (probs,) = attention.values()
            self.score = attention_entropy(probs)

    def scores(self) -> torch.Tensor:
        return self.score.cpu()
