"""The parts every family's tiny test pipeline shares: sizes, tokenizers built offline, text encoders and a VAE.

Each family file builds its own tiny pipeline from these (``tiny(...)`` in :mod:`memaudit.families.sdxl`,
:mod:`~memaudit.families.sd3`, :mod:`~memaudit.families.flux`, :mod:`~memaudit.families.pixart`);
:mod:`memaudit.tiny_families` is the entry point tests and benchmarks use. Weights are random but deterministic:
``torch.manual_seed(seed)`` is called before each component is built; everything is float32.

CLIP tokenizers are the real, full CLIP BPE (49,408 tokens, :func:`memaudit.tokenizers.build_clip_tokenizer`)
shortened to :data:`CLIP_MAX_LENGTH` tokens; the T5 tokenizer is a small Unigram model estimated in code on a
built-in English corpus (:func:`t5_tokenizer`).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from functools import lru_cache

import torch

from memaudit.tokenizers import build_clip_tokenizer

__all__ = ["CLIP_MAX_LENGTH", "LATENT_SIZE", "RESOLUTION", "SDXL_VAE", "T5_MAX_LENGTH", "VAE_CHANNELS",
           "clip_text_encoder", "clip_tokenizer", "t5_corpus", "t5_text_encoder", "t5_tokenizer", "t5_vocab",
           "tiny_vae"]

RESOLUTION = 32  # pixel height and width of every tiny family (16x16 latents)
CLIP_MAX_LENGTH = 16  # tokens of the CLIP tokenizers (and positions of the CLIP text encoders)
T5_MAX_LENGTH = 32  # the T5 tokenizer's model_max_length: the max_sequence_length to pass to PixArt

VAE_CHANNELS = (8, 16)  # two VAE blocks: vae_scale_factor 2
LATENT_SIZE = RESOLUTION // 2 ** (len(VAE_CHANNELS) - 1)
#: the SDXL VAE's latent statistics (SDXL; PixArt-Sigma uses the SDXL VAE)
SDXL_VAE = dict(latent_channels=4, scaling_factor=0.13025)


# --------------------------------------------------------------------------------------------------- tokenizers

@lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """The real (full) CLIP tokenizer, truncating and padding to ``model_max_length`` tokens (cached: do not modify)."""
    return build_clip_tokenizer(model_max_length=model_max_length)


_T5_SUBJECTS = (
    "cat", "dog", "horse", "bird", "fish", "cow", "sheep", "rabbit", "fox", "bear", "lion", "tiger", "elephant",
    "squirrel", "owl", "duck", "man", "woman", "child", "boy", "girl", "person", "people", "face", "portrait",
    "astronaut", "robot", "car", "bus", "train", "bicycle", "boat", "ship", "airplane", "house", "building", "castle",
    "bridge", "tower", "street", "city", "village", "road", "mountain", "river", "lake", "ocean", "beach", "forest",
    "tree", "flower", "garden", "field", "desert", "sky", "cloud", "sun", "moon", "star", "chair", "table", "bed",
    "lamp", "window", "door", "book", "cup", "bottle", "apple", "banana", "orange", "burger", "pizza", "cake",
    "bowl", "plate", "clock", "phone", "computer", "guitar", "piano", "shoe", "hat", "shirt", "dress", "bag",
    "painting", "logo", "sign", "map", "item", "object", "texture", "pattern", "landscape", "room", "kitchen",
)
_T5_MEDICAL = (
    "chest x-ray", "frontal chest x-ray", "lateral chest radiograph", "brain mri scan", "knee mri", "ct scan of the",
    "abdomen", "lung", "lungs", "heart", "rib", "ribs", "spine", "skull", "bone", "fracture", "pneumonia", "effusion",
    "cardiomegaly", "edema", "nodule", "mass", "opacity", "atelectasis", "no acute findings", "normal study",
    "patient", "left", "right", "upper", "lower", "lobe", "skin lesion", "dermoscopy image", "retina fundus photo",
    "histology slide", "tissue", "cell", "cells", "tumor", "benign", "malignant", "ultrasound", "scan", "image",
)
_T5_ADJECTIVES = (
    "red", "green", "blue", "yellow", "black", "white", "gray", "brown", "pink", "purple", "golden", "silver",
    "small", "large", "tiny", "huge", "old", "young", "new", "happy", "sad", "beautiful", "dark", "bright",
    "colorful", "wooden", "metal", "glass", "stone", "soft", "sharp", "blurry", "detailed", "realistic", "smiling",
)
_T5_TEMPLATES = (
    "a photo of a {a} {s}", "a painting of a {s}", "a close-up photo of the {s}", "an image of a {a} {s}",
    "A photograph of a {s} in the {p}", "a {a} {s} on a {s2}", "a drawing of two {s}s", "the {s} next to a {a} {s2}",
    "a high quality photo of a {s}, {a} lighting", "a picture of my {s}", "a rendering of a {s} at night",
    "a portrait of a {a} {s}", "a {s} and a {s2} in the {p}", "an oil painting of a {s} by the {p}",
)
_T5_PLACES = ("park", "snow", "rain", "city", "forest", "kitchen", "studio", "street", "desert", "sea", "garden")
_T5_SENTENCES = (
    "a photo of", "an image of", "a painting of a squirrel eating a burger", "A painting of a squirrel eating a burger",
    "a photo of a cat", "a photo of a dog", "a photo of an astronaut riding a horse on the moon",
    "A photo of a cat sitting on a chair.", "The quick brown fox jumps over the lazy dog.",
    "a face of a smiling woman with long hair", "a face of an old man with a beard", "a close-up of a face",
    "an x-ray of the chest", "chest x-ray: no acute cardiopulmonary process.", "frontal and lateral views of the chest",
    "there is no pneumothorax or pleural effusion", "the heart size is normal", "mild cardiomegaly", "trained on",
    "memorized training image", "a duplicate of a training image", "a caption", "a prompt", "a sample", "a copy",
    "item 0", "item 1", "item 2", "item 3", "item 4", "item 5", "item 6", "item 7", "item 8", "item 9", "item 10",
    "image 12", "number 42", "the year 2024", "1 2 3 4 5 6 7 8 9 0", "10 20 30 40 50 60 70 80 90 100",
    "one two three four five six seven eight nine ten", "first second third", "with", "without", "and", "or",
    "in", "on", "at", "of", "the", "a", "an", "is", "are", "was", "this", "that", "it", "by", "for", "from", "to",
    "very", "high resolution, 4k, trending on artstation", "digital art", "watercolor", "sketch", "cartoon",
    "black and white photo", "in the style of van gogh", "cinematic lighting", "studio lighting", "background",
    "Hello, world!", "What is this? It's a test: (1) yes; (2) no.", "x-ray", "MRI", "CT", "USA", "New York",
    "he has his, she has her, they have their, it has its, I have my, you have your", "not no yes all some many",
    "showing shows shown holding looking wearing standing walking running flying sleeping playing reading",
    "there here up down inside outside under over near behind front side top bottom center middle",
)


@lru_cache(maxsize=1)
def t5_corpus() -> tuple[str, ...]:
    """The fixed English corpus the T5 tokenizer is trained on (a few hundred phrases and sentences)."""
    lines = list(_T5_SENTENCES) + list(_T5_MEDICAL)
    n_s, n_a, n_p, n_t = len(_T5_SUBJECTS), len(_T5_ADJECTIVES), len(_T5_PLACES), len(_T5_TEMPLATES)
    for i, subject in enumerate(_T5_SUBJECTS):
        for k in range(3):  # three deterministic captions per subject
            j = 3 * i + k
            lines.append(_T5_TEMPLATES[j % n_t].format(
                s=subject, s2=_T5_SUBJECTS[(7 * j + 3) % n_s], a=_T5_ADJECTIVES[(5 * j + k) % n_a],
                p=_T5_PLACES[j % n_p]))
    for i, term in enumerate(_T5_MEDICAL):
        lines.append(f"a {term} of patient {i}, {_T5_MEDICAL[(3 * i + 1) % len(_T5_MEDICAL)]}")
    lines.extend(f"a photo of item {i}" for i in range(50))
    lines.append(" ".join(_T5_ADJECTIVES))
    return tuple(lines)


@lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """The (piece, log probability) vocabulary of the T5 tokenizer's Unigram model, estimated on :func:`t5_corpus`.

    ``<pad>``, ``</s>`` and ``<unk>`` are ids 0, 1 and 2, as in T5. Then come the corpus's words as pieces (with the
    word-start mark ``▁`` that the Metaspace pre-tokenizer puts before every word), scored by their log
    frequency among the corpus's words, then ``▁`` and every printable ASCII character, scored by their log
    frequency among its characters minus 10 (so that a known word is always one piece, an unknown one the fewest
    known pieces, and no ASCII text maps to ``<unk>``). Ties are ordered by text: the same ids in every process.
    (The ``tokenizers`` Unigram trainer is not used: on a corpus this small it keeps few whole words, and it orders
    tied pieces in hash-set order, which changes from one process to the next.)
    """
    words = Counter()
    for line in t5_corpus():
        words.update("▁" + word for word in line.split())
    chars = Counter({"▁": sum(words.values())})
    for word, count in words.items():
        for c in word[1:]:
            chars[c] += count
    alphabet = [c for c in string.printable if not c.isspace()]
    chars.update({c: 0 for c in alphabet})
    n_words, n_chars = sum(words.values()), sum(chars.values()) + len(chars)
    vocab = [(w, round(math.log(n / n_words), 6)) for w, n in words.items()]
    vocab = sorted(vocab, key=lambda item: (-item[1], item[0]))
    vocab += sorted(((c, round(math.log((n + 1) / n_chars) - 10.0, 6)) for c, n in chars.items()),
                    key=lambda item: (-item[1], item[0]))
    return (("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *vocab)


@lru_cache(maxsize=4)
def _t5_tokenizer(model_max_length: int):
    from transformers import T5Tokenizer  # transformers: a measured import cost, paid only for test models

    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A small T5 tokenizer (``transformers.T5Tokenizer``, a Unigram model) built offline, always the same.

    ``<pad>`` is id 0, ``</s>`` id 1 (appended to every sequence) and ``<unk>`` id 2, as in T5. Its vocabulary is
    :func:`t5_vocab`. It saves with ``save_pretrained`` (``tokenizer.json``) and reloads with ``from_pretrained`` or
    ``AutoTokenizer``. A cached instance: do not modify it.
    """
    return _t5_tokenizer(int(model_max_length))


# --------------------------------------------------------------------------------------------------- components

def clip_text_encoder(seed: int, tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None,
                      with_projection: bool = False, hidden_act: str = "quick_gelu"):
    """A tiny CLIP text encoder over the tokenizer's whole vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # measured import cost

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
        projection_dim=projection or hidden, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_text_encoder(seed: int, tokenizer, d_model: int = 32, layers: int = 2, heads: int = 4):
    """A tiny T5 v1.1 encoder (gated GELU, untied embeddings), like the T5-XXL encoder of SD3, Flux and PixArt."""
    from transformers import T5Config, T5EncoderModel  # transformers: a measured import cost

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def tiny_vae(seed: int, **latent):
    """A two-block AutoencoderKL (scale factor 2) with the given latent statistics."""
    from diffusers import AutoencoderKL  # diffusers: a measured import cost, paid only for test models

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS), block_out_channels=VAE_CHANNELS,
        layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION, **latent).eval()
