"""How far a product (or person) number moves a caption's text embedding, per bundled base: RESULTS.md section 16.

A fine-tune with a frozen text encoder can only tell two training items apart through their captions' embeddings.
For each base, the cosine similarity between the text encoder's outputs (the caption's own tokens, padding aside)
of one caption and of captions differing only in the number, and, for fashion, only in the class. Seconds to run.

    python benchmarks/caption_keys.py
"""

from __future__ import annotations

import sys

import torch
from common import machine

from memaudit import demo
from memaudit.demo import fashion
from memaudit.target import load_target

FACES = ["a photo of the face of person two six two", "a photo of the face of person four one seven",
         "a photo of the face of person nine nine zero", "a photo of the face of person two six three"]


@torch.no_grad()
def similarities(model, captions: list[str]) -> list[float]:
    """Cosine similarity of the first caption's embedding to each other's (the caption's own tokens)."""
    target = load_target(str(model), device="cpu")
    emb = target.encode_prompts(captions).tensors["prompt_embeds"]
    emb = emb[:, :len(target.tokenizer(captions[0])["input_ids"])].flatten(1)
    return torch.nn.functional.cosine_similarity(emb[:1], emb[1:]).tolist()


def main() -> int:
    rows = [("fashion base", "same class, other product numbers", fashion.FASHION_DIR / "base",
             [fashion.caption(7, n) for n in (407, 123, 958, 311)]),
            ("fashion base", "same product number, other classes", fashion.FASHION_DIR / "base",
             [fashion.caption(c, 407) for c in (7, 0, 3, 8)]),
            ("faces base", "other person numbers", demo.BASE_MODEL, FACES)]
    print(f"Machine: {machine('cpu')}\n\n| base | captions differing in | cosine similarity to the first |\n|---|---|---|")
    for base, differ, model, captions in rows:
        print(f"| {base} | {differ} | {', '.join(f'{s:.4f}' for s in similarities(model, captions))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
