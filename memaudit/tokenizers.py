"""A real CLIP tokenizer built offline from the BPE merges file that open_clip ships.

Stable Diffusion 1.x uses OpenAI's CLIP tokenizer: 49,408 tokens made of 256 byte symbols, the same symbols with
an end-of-word mark, 48,894 merges, and two special tokens. open_clip ships the merges file inside its wheel, so
the exact tokenizer can be rebuilt with no network. ``words`` restricts the vocabulary to the merges that those
words need (plus every byte symbol), which gives a small but still complete tokenizer: any text still tokenizes,
falling back to shorter pieces, and the words given tokenize exactly as with the full vocabulary.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from functools import lru_cache

import regex

from memaudit.core.errors import TargetError

N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_file() -> str:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):  # pragma: no cover - depends on the installed open_clip

        raise TargetError(f"open_clip's BPE vocabulary is missing ({path}); reinstall open_clip_torch.")
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map of GPT-2 and CLIP; its insertion order is CLIP's vocabulary.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The full list of CLIP BPE merges, in rank order."""
    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def _word_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges that CLIP's BPE applies to one (already byte-encoded) word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def clip_vocab(words: Iterable[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges (pairs) of the CLIP tokenizer, optionally restricted to ``words``."""
    merges = list(clip_merges())
    if words is not None:
        ranks = {m: i for i, m in enumerate(merges)}
        byte_enc = _bytes_to_unicode()
        pieces = set()
        # CLIP's own pre-tokenization pattern (letters and digits in the Unicode sense)
        pattern = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
        for text in words:
            for piece in pattern.findall(text.lower()):
                pieces.add("".join(byte_enc[b] for b in piece.encode("utf-8")))
        keep = set()
        for piece in pieces:
            keep.update(_word_merges(piece, ranks))
        merges = [m for m in merges if m in keep]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_clip_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` equal to OpenAI's CLIP tokenizer (or its restriction to ``words``)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab(words)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )
