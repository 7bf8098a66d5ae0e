"""The tiny pipelines of every model family: they run, are deterministic, and round-trip through save_pretrained."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from memaudit import tiny_families as tf

PROMPT = "a photo of a face"


def _generate(pipe, name, **extra):
    kw = {**tf.call_kwargs(name), **extra}
    out = pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0), **kw)
    return out.images


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for key, value in component.state_dict().items()}


@pytest.fixture(scope="module")
def pipes():
    """Each family's pipeline, built once for the module and its first 2-step image (keyed by family name)."""
    built = {}

    def get(name):
        if name not in built:
            pipe = tf.tiny_family(name)
            pipe.set_progress_bar_config(disable=True)
            built[name] = (pipe, _generate(pipe, name))
        return built[name]

    return get


@pytest.mark.parametrize("name", tf.FAMILY_NAMES)
def test_generates_deterministically(pipes, name):
    pipe, image = pipes(name)
    assert image.shape == (1, 3, tf.RESOLUTION, tf.RESOLUTION)
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.01
    assert torch.equal(_generate(pipe, name), image)  # the same generator seed gives the same image
    assert tf.default_resolution(pipe) == tf.RESOLUTION
    assert all(p.dtype == torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())


@pytest.mark.parametrize("name", tf.FAMILY_NAMES)
def test_build_is_deterministic(pipes, name):
    pipe, _ = pipes(name)
    first, again = _state(pipe), _state(tf.tiny_family(name, seed=0))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _state(tf.tiny_family(name, seed=1))
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", [n for n in tf.FAMILY_NAMES if not n.startswith("flux")])
def test_default_size_without_height_width(pipes, name):
    """All but Flux generate RESOLUTION px images when height and width are not given."""
    pipe, image = pipes(name)
    extra = {k: v for k, v in tf.call_kwargs(name).items() if k not in ("height", "width")}
    out = pipe(PROMPT, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0), **extra)
    assert torch.equal(out.images, image)


@pytest.mark.parametrize("name", tf.FAMILY_NAMES)
def test_save_and_reload_offline(pipes, name, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, image = pipes(name)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    assert tf.call_kwargs(reloaded) == tf.call_kwargs(name)
    assert float((_generate(reloaded, name) - image).abs().max()) <= 1e-6


def test_family_configurations():
    from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    dev, schnell = tf.tiny_family("flux-dev"), tf.tiny_family("flux-schnell")
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    assert (dev.scheduler.config.base_shift, dev.scheduler.config.max_shift) == (0.5, 1.15)
    assert schnell.scheduler.config.shift == 1.0
    assert dev.vae.config.latent_channels == 16 and dev.transformer.config.in_channels == 64
    with pytest.raises(ValueError):
        tf.tiny_flux("pro")
    with pytest.raises(ValueError):
        tf.tiny_family("sd4")

    sd2 = tf.tiny_family("sd2")
    assert isinstance(sd2, StableDiffusionPipeline) and sd2.scheduler.config.prediction_type == "v_prediction"
    sdxl = tf.tiny_family("sdxl")
    assert sdxl.config.force_zeros_for_empty_prompt and sdxl.unet.config.addition_embed_type == "text_time"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    sd3 = tf.tiny_family("sd3")
    assert isinstance(sd3, StableDiffusion3Pipeline) and sd3.vae.config.shift_factor == 0.0609
    pixart = tf.tiny_family("pixart-sigma")
    assert isinstance(pixart, PixArtSigmaPipeline)
    assert pixart.transformer.config.out_channels == 2 * pixart.transformer.config.in_channels
    for pipe in (sdxl, sd3, dev, pixart):
        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, attr, None)
            if encoder is not None:
                tokenizer = getattr(pipe, attr.replace("text_encoder", "tokenizer"))
                assert encoder.config.vocab_size >= len(tokenizer)


# The ids of a fixed sentence: a change means the vocabulary changed (and with it every tiny T5 model's meaning).
SENTENCE = "a photo of a face, chest x-ray 42"
SENTENCE_IDS = [3, 5, 4, 3, 60, 514, 36, 46, 177, 1, 0, 0, 0, 0, 0, 0]


def _encode(tokenizer):
    return tokenizer(SENTENCE, padding="max_length", max_length=16, truncation=True, add_special_tokens=True,
                     return_tensors="pt")


def test_t5_tokenizer_ids_are_stable():
    tok = tf.t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == tf.T5_MAX_LENGTH and len(tok) == len(tf.t5_vocab())
    enc = _encode(tok)
    assert enc.input_ids.tolist() == [SENTENCE_IDS]
    assert enc.attention_mask.tolist() == [[int(i != 0) for i in SENTENCE_IDS]]
    assert tok.batch_decode(enc.input_ids, skip_special_tokens=True) == [SENTENCE]
    assert tok(SENTENCE).input_ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in tok("Any ASCII text: {x} = [1, 2] & 100% ~ok?").input_ids
    short = tok(SENTENCE, padding="max_length", max_length=4, truncation=True).input_ids
    assert short == SENTENCE_IDS[:3] + [1]  # truncation keeps the appended </s>


def test_t5_vocab_is_the_same_in_another_process():
    digest = hashlib.sha256(json.dumps(tf.t5_vocab()).encode()).hexdigest()
    code = ("import hashlib, json; from memaudit.tiny_families import t5_vocab; "
            "print(hashlib.sha256(json.dumps(t5_vocab()).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest


def test_t5_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, T5Tokenizer

    tok = tf.t5_tokenizer()
    tok.save_pretrained(tmp_path)
    for cls in (T5Tokenizer, AutoTokenizer):
        again = cls.from_pretrained(tmp_path)
        assert isinstance(again, T5Tokenizer) and len(again) == len(tok)
        assert _encode(again).input_ids.tolist() == [SENTENCE_IDS]
        assert again.model_max_length == tf.T5_MAX_LENGTH
        assert again.get_vocab() == tok.get_vocab()
