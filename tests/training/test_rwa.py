"""Random word addition: exactly k tokens, the caption's words in order, reproducible by seed, re-drawn per step."""

from __future__ import annotations

import pytest
import torch

from memaudit.baselines.rwa import RWAHook, insert_random_words, random_tokens, rwa_prompts
from memaudit.core.errors import ConfigError
from memaudit.testing import clip_tokenizer as _tokenizer
from memaudit.training import TrainConfig, TrainHook, train_unet

CAPTION = "a photo of the face of person two six two"


@pytest.fixture(scope="module")
def tok():
    return _tokenizer(16)


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(any(w == x for x in it) for w in short)


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_inserts_exactly_k_tokens_and_keeps_order(tok, k):
    out = insert_random_words(CAPTION, tok, k, torch.Generator().manual_seed(k))
    words = out.split()
    assert len(words) == len(CAPTION.split()) + k
    assert _is_subsequence(CAPTION.split(), words)


def test_tokens_come_from_the_vocabulary_and_skip_special_tokens(tok):
    tokens = random_tokens(tok, 50, torch.Generator().manual_seed(0))
    assert len(tokens) == 50 and all(t and " " not in t for t in tokens)
    assert not {"<|startoftext|>", "<|endoftext|>"} & set(tokens)


def test_reproducible_by_seed(tok):
    a = rwa_prompts([CAPTION, "a cat"], tok, k=3, seed=4)
    assert a == rwa_prompts([CAPTION, "a cat"], tok, k=3, seed=4)
    assert a != rwa_prompts([CAPTION, "a cat"], tok, k=3, seed=5)


def test_bad_settings(tok):
    with pytest.raises(ConfigError):
        RWAHook(tok, k=-1)
    with pytest.raises(ConfigError):
        RWAHook(tok, p=1.5)


class _Record(TrainHook):
    def __init__(self):
        self.seen = []

    def on_batch(self, batch, state):
        self.seen.append(list(batch.captions))
        return batch


def test_hook_redraws_every_step_and_respects_p(tiny_dir_eps, make_dataset):
    from memaudit.target import load_target

    data = make_dataset(n=4)
    seen = {}
    for p, expect_changed in ((1.0, True), (0.0, False)):
        target = load_target(tiny_dir_eps, device="cpu")
        rec = _Record()
        res = train_unet(target, data, TrainConfig(steps=3, batch_size=4, caption_dropout=0.0, seed=0),
                         hooks=[RWAHook(target.tokenizer, k=2, p=p), rec])
        for step in rec.seen:
            changed = [c not in data.captions for c in step]
            assert all(changed) if expect_changed else not any(changed)
            for c in step:  # every caption still holds one original caption's words, in order
                assert any(_is_subsequence(o.split(), c.split()) for o in data.captions)
        assert res.stats.get("rwa_perturbed", 0) == (12 if expect_changed else 0)
        seen[p] = [c for step in rec.seen for c in step]
    # p=1: each of the 4 captions seen at 3 steps, perturbed afresh every time: 12 distinct captions
    assert len(set(seen[1.0])) == 12
    assert set(seen[0.0]) == set(data.captions)
