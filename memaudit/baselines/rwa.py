"""Random word addition (RWA; Somepalli et al., NeurIPS 2023): perturb captions so a caption stops being a key.

``k`` random tokens, decoded from random ids of the target's own tokenizer vocabulary (BPE pieces, not dictionary
words), are inserted at random word positions of a caption; the rest of the caption keeps its order.

- Training time (:class:`RWAHook`): each sample's caption is perturbed with probability ``p``, drawn afresh at every
  step from the training run's seeded generator, so the same image is seen with different perturbations over
  training. The MemControl code drew one perturbation per caption once, before training; a fixed perturbation is
  just another unique caption, which a model can memorize as well as the original, so we re-draw.
- Inference time (:func:`rwa_prompts`, and :class:`RWAPrompts` as the sampler's ``prompt_transform``): each prompt
  is perturbed before generation, every generation with its own draw seeded by the image's seed, so an audit can
  measure a checkpoint "with RWA on".

Defaults (``k=2`` tokens, ``p=0.5``) are settings, not values fixed by the papers; report the ones you use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from memaudit.core.errors import ConfigError
from memaudit.training import Batch, TrainHook, TrainState

MAX_DRAWS = 64


def check_settings(k: int, p: float = 1.0) -> None:
    if not isinstance(k, int) or k < 0:
        raise ConfigError(f"RWA words k must be a whole number >= 0 (got {k!r}).")
    if not 0 <= p <= 1:
        raise ConfigError(f"RWA probability p must be in [0, 1] (got {p!r}).")


def random_tokens(tokenizer, k: int, generator: torch.Generator) -> list[str]:
    """``k`` decoded random tokens of ``tokenizer``'s vocabulary (no special tokens, none empty or whitespace)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    out: list[str] = []
    draws = 0
    while len(out) < k:
        draws += 1
        if draws > MAX_DRAWS * max(k, 1):
            raise ConfigError("the tokenizer's vocabulary has too few printable tokens for random word addition.")
        tid = int(torch.randint(0, vocab, (1,), generator=generator))
        if tid in special:
            continue
        text = tokenizer.decode([tid]).strip()
        if text and not any(ch.isspace() for ch in text):
            out.append(text)
    return out


def insert_random_words(caption: str, tokenizer, k: int, generator: torch.Generator) -> str:
    """``caption`` with ``k`` random tokens inserted at random word positions (before, between or after words)."""
    check_settings(k)
    words = caption.split()
    for token in random_tokens(tokenizer, k, generator):
        pos = int(torch.randint(0, len(words) + 1, (1,), generator=generator))
        words.insert(pos, token)
    return " ".join(words)


def rwa_prompts(prompts: Sequence[str], tokenizer, k: int = 2, seed: int = 0) -> list[str]:
    """Inference-time RWA: every prompt perturbed, reproducibly for a seed (prompt ``i`` uses ``seed + i``)."""
    check_settings(k)
    return [insert_random_words(p, tokenizer, k, torch.Generator().manual_seed(seed + i)) for i, p in enumerate(prompts)]


class RWAPrompts:
    """Inference-time RWA as a :class:`~memaudit.sampling.Sampler` ``prompt_transform``: every generation's prompt
    gets ``k`` random tokens, drawn from a generator seeded by the image's seed (a stream separate from its noise)."""

    STREAM = 0x525741  # "RWA": keeps the word draws independent of the image's noise draws

    def __init__(self, tokenizer, k: int = 2):
        check_settings(k)
        self.tokenizer, self.k = tokenizer, k

    def __call__(self, prompt: str, image_seed: int) -> str:
        seed = int(np.random.SeedSequence([int(image_seed), self.STREAM]).generate_state(1, np.uint64)[0] % 2**63)
        return insert_random_words(prompt, self.tokenizer, self.k, torch.Generator().manual_seed(seed))


class RWAHook(TrainHook):
    """Training-time RWA for :func:`memaudit.training.train_denoiser`: perturbs each caption with probability ``p``.

    Empty captions (classifier-free guidance dropout) stay empty. ``state.stats['rwa_perturbed']`` counts the
    perturbed captions.
    """

    name = "rwa"

    def __init__(self, tokenizer, k: int = 2, p: float = 0.5):
        check_settings(k, p)
        self.tokenizer, self.k, self.p = tokenizer, k, p

    def on_batch(self, batch: Batch, state: TrainState) -> Batch:
        g = state.generator
        chosen = (torch.rand(len(batch.captions), generator=g) < self.p).tolist()
        captions = []
        for caption, pick in zip(batch.captions, chosen):
            if pick and caption:
                caption = insert_random_words(caption, self.tokenizer, self.k, g)
                state.stats["rwa_perturbed"] = state.stats.get("rwa_perturbed", 0) + 1
            captions.append(caption)
        batch.captions = captions
        return batch
