"""How far a product (or person) number moves a caption's text embedding, per bundled base: RESULTS.md section 16.

A fine-tune with a frozen text encoder can only tell two training items apart through their captions' embeddings.
For each base, the cosine similarity between the text encoder's outputs of one caption and of captions differing
only in the number (and, for fashion, only in the class): over the caption's own tokens (padding aside), and at
each of the three number words alone (what cross-attention reads there). Seconds to run.

    python benchmarks/caption_keys.py
    python benchmarks/caption_keys.py --fashion-base zoo-build-fashion/base-checkpoints/step-0000250/pipeline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import machine

from memaudit import demo
from memaudit.core.errors import MemauditError
from memaudit.demo import fashion
from memaudit.target import load_target

FACES = ["a photo of the face of person two six two", "a photo of the face of person four one seven",
         "a photo of the face of person nine nine zero", "a photo of the face of person two six three"]


@torch.no_grad()
def similarities(model, captions: list[str]) -> tuple[list[float], list[list[float]]]:
    """Cosine similarity of the first caption's embedding to each other's: over the caption's own tokens, and at
    each of the three number words (the tokens before the end token)."""
    target = load_target(str(model), device="cpu")
    emb = target.encode_prompts(captions).tensors["prompt_embeds"]
    n = len(target.tokenizer(captions[0])["input_ids"])
    whole = torch.nn.functional.cosine_similarity(emb[:1, :n].flatten(1), emb[1:, :n].flatten(1)).tolist()
    words = [torch.nn.functional.cosine_similarity(emb[:1, k], emb[1:, k]).tolist() for k in range(n - 4, n - 1)]
    return whole, words


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fashion-base", type=Path, default=fashion.FASHION_DIR / "base",
                    help="the fashion base to measure (a pipeline folder; default: the bundled one)")
    args = ap.parse_args(argv)
    rows = [("fashion base", "same class, other product numbers", args.fashion_base,
             [fashion.caption(7, n) for n in (407, 123, 958, 311)]),
            ("fashion base", "same product number, other classes", args.fashion_base,
             [fashion.caption(c, 407) for c in (7, 0, 3, 8)]),
            ("faces base", "other person numbers", demo.BASE_MODEL, FACES)]
    print(f"Machine: {machine('cpu')}; fashion base: {args.fashion_base}\n\n| base | captions differing in | "
          "cosine similarity to the first | at the 1st, 2nd, 3rd number word |\n|---|---|---|---|")
    for base, differ, model, captions in rows:
        try:
            whole, words = similarities(model, captions)
        except MemauditError as e:  # a missing or unreadable base: one line
            raise SystemExit(f"{base}: {e}") from None
        at = "; ".join(", ".join(f"{s:.3f}" for s in w) for w in words)
        print(f"| {base} | {differ} | {', '.join(f'{s:.4f}' for s in whole)} | {at} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
