"""SD3 and Flux sample exactly as the plain pipeline call with its own defaults: ``max_sequence_length`` 256 (SD3)
and 512 (Flux) T5 tokens, whatever the T5 tokenizer's ``model_max_length`` (32 for the tiny models)."""

from __future__ import annotations

import pytest
import torch

from memaudit.sampling import Sampler
from memaudit.target import from_pipeline
from memaudit.tiny_families import RESOLUTION, T5_MAX_LENGTH, tiny_family

PROMPTS = ["a photo of a face", "a chest x-ray"]
STEPS = 2
GUIDANCE = 4.0
#: the tiny family, the pipeline's own max_sequence_length default (diffusers 0.42), the T5 tokenizer's name
CASES = [("sd3", 256, "tokenizer_3"), ("flux-dev", 512, "tokenizer_2"), ("flux-schnell", 512, "tokenizer_2")]


def _plain(pipe, seeds, **extra):
    """The call a user makes: prompts, steps, one generator per image, guidance, output type; no
    max_sequence_length (Flux needs the size: its own default ignores the model). Returns the images and the T5
    length of the transformer's text input."""
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    size = {"height": RESOLUTION, "width": RESOLUTION} if type(pipe).__name__ == "FluxPipeline" else {}
    try:
        images = pipe([p for p in PROMPTS for _ in range(2)], num_inference_steps=STEPS,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], guidance_scale=GUIDANCE,
                      output_type="pt", **size, **extra).images
    finally:
        handle.remove()
    return images, set(seen)


@pytest.mark.parametrize("name,default,tokenizer", CASES, ids=[c[0] for c in CASES])
def test_images_equal_the_plain_call_with_its_defaults(name, default, tokenizer):
    pipe = tiny_family(name)
    pipe.set_progress_bar_config(disable=True)
    assert getattr(pipe, tokenizer).model_max_length == T5_MAX_LENGTH < default  # the tokenizer says less
    target = from_pipeline(pipe, device="cpu")
    assert target.family.max_sequence_length(pipe) == default

    text_lengths = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: text_lengths.append(kw["encoder_hidden_states"].shape[1]), with_kwargs=True)
    try:
        batch = next(iter(Sampler(target, steps=STEPS, guidance=GUIDANCE, batch_size=4, seed=0).run(PROMPTS, 2)))
    finally:
        handle.remove()
    plain, plain_lengths = _plain(pipe, batch.seeds)
    assert set(text_lengths) == plain_lengths  # the same text sequence (SD3: CLIP tokens + T5 tokens)
    assert float((plain - batch.images).abs().max()) <= 1e-5

    # the tokenizer's own length (what memaudit used before) makes other images: the comparison can fail
    shorter, _ = _plain(pipe, batch.seeds, max_sequence_length=T5_MAX_LENGTH)
    assert float((shorter - batch.images).abs().max()) > 1e-4
