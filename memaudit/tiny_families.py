"""Tiny text-to-image pipelines of every model family, built in code with random weights, for tests and benchmarks.

Each builder returns an in-memory diffusers pipeline of the real class, so ``pipe(...)`` runs end to end and
``pipe.save_pretrained(folder, safe_serialization=True)`` followed by ``DiffusionPipeline.from_pretrained(folder)``
round-trips with no network. Weights are random but deterministic: ``torch.manual_seed(seed)`` is called before
each component is built (default seed 0); everything is float32. The sizes follow the ``get_dummy_components`` of
diffusers' own pipeline tests, with tokenizers built offline instead of downloaded:

- :func:`tiny_sd` -- ``StableDiffusionPipeline`` with the Stable Diffusion 1.x layout (UNet2DConditionModel, CLIP
  text encoder, AutoencoderKL, DDIM); ``prediction_type="v_prediction"`` gives the SD 2.x case.
- :func:`tiny_sdxl` -- ``StableDiffusionXLPipeline``: two CLIP text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``, whose concatenated penultimate hidden states are the cross attention context and
  whose projection is the pooled embedding), a UNet with ``addition_embed_type="text_time"``, SDXL's
  EulerDiscreteScheduler and VAE scaling factor, ``force_zeros_for_empty_prompt=True``, no image encoder.
- :func:`tiny_sd3` -- ``StableDiffusion3Pipeline``: SD3Transformer2DModel, CLIP-L and CLIP-G (both with projection),
  a T5 encoder, FlowMatchEulerDiscreteScheduler (shift 3) and a 16-channel AutoencoderKL with SD3's shift and
  scaling factors and no quant convs.
- :func:`tiny_flux` -- ``FluxPipeline``: FluxTransformer2DModel (guidance embedding for ``"dev"``, none for
  ``"schnell"``), a CLIP text model (pooled), a T5 encoder, each variant's FlowMatchEulerDiscreteScheduler
  configuration and a 16-channel AutoencoderKL with Flux's shift and scaling factors.
- :func:`tiny_pixart_sigma` -- ``PixArtSigmaPipeline``: PixArtTransformer2DModel with learned sigma (twice as many
  output as input channels), a T5 encoder, DPMSolverMultistepScheduler (as in diffusers' conversion script) and
  an AutoencoderKL with the SDXL VAE's scaling factor (PixArt-Sigma uses the SDXL VAE).
- :func:`tiny_family` -- dispatch over :data:`FAMILY_NAMES`.

Every pipeline makes :data:`RESOLUTION` (32) pixel images from 16x16 latents (the VAEs have two blocks, a scale
factor of 2). CLIP tokenizers are the real, full CLIP BPE (49,408 tokens, :func:`memaudit.tokenizers.
build_clip_tokenizer`) shortened to :data:`CLIP_MAX_LENGTH` tokens; the T5 tokenizer is a small Unigram
model estimated in code on a built-in English corpus (:func:`t5_tokenizer`).

What a caller must pass (:func:`call_kwargs` returns it for a family name or a pipeline):

- ``height``/``width``: not needed for "sd", "sd2", "sdxl", "sd3" and "pixart-sigma" (their default is
  :data:`RESOLUTION`, derived from the UNet's or transformer's ``sample_size``), but **required for Flux**:
  ``FluxPipeline`` always defaults to ``128 * vae_scale_factor`` pixels (256 px here, 4,096 image tokens).
  :func:`default_resolution` gives the intended size of any of these pipelines.
- ``max_sequence_length``: not for SD3 and Flux, which memaudit samples at their pipelines' defaults (256 and 512
  T5 tokens) as a plain call does (the T5 tokenizer pads to any length; T5 has relative positions), but
  ``max_sequence_length=T5_MAX_LENGTH`` (32, the T5 tokenizer's ``model_max_length``) for PixArt-Sigma, whose
  family encodes at most the tokenizer's length (:meth:`memaudit.families.pixart.PixArt.max_sequence_length`).
- ``use_resolution_binning=False`` for PixArt-Sigma: binning (on by default) only knows transformer sample sizes
  of 32 to 256 latents (256 to 2048 px) and raises ``ValueError: Invalid sample size`` for the tiny model. Also
  ``clean_caption=False``: the default ``True`` needs beautifulsoup4 and ftfy (it warns and skips cleaning without
  them, so the output would depend on what is installed).
"""

from __future__ import annotations

import string
from functools import lru_cache

import torch

FAMILY_NAMES = ("sd", "sd2", "sdxl", "sd3", "flux-dev", "flux-schnell", "pixart-sigma")
RESOLUTION = 32  # pixel height and width of every tiny family (16x16 latents)
CLIP_MAX_LENGTH = 16  # tokens of the CLIP tokenizers (and positions of the CLIP text encoders)
T5_MAX_LENGTH = 32  # the T5 tokenizer's model_max_length: the max_sequence_length to pass to PixArt

_VAE_CHANNELS = (8, 16)  # two VAE blocks: vae_scale_factor 2
_LATENT_SIZE = RESOLUTION // 2 ** (len(_VAE_CHANNELS) - 1)

# Scheduler configurations of the released models (their scheduler_config.json; PixArt-Sigma's are the defaults of
# DPMSolverMultistepScheduler, which diffusers' conversion script uses).
_SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                       interpolation_type="linear", use_karras_sigmas=False)
_SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
_FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
_PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++",
                         solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
# VAE latent statistics of the released models.
_SDXL_VAE = dict(latent_channels=4, scaling_factor=0.13025)
_SD3_VAE = dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)
_FLUX_VAE = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False)


# --------------------------------------------------------------------------------------------------- tokenizers

@lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """The real (full) CLIP tokenizer, truncating and padding to ``model_max_length`` tokens (cached: do not modify)."""
    from memaudit.tokenizers import build_clip_tokenizer

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
    import math
    from collections import Counter

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
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = T5_MAX_LENGTH):
    """A small T5 tokenizer (``transformers.T5Tokenizer``, a Unigram model) built offline, always the same.

    ``<pad>`` is id 0, ``</s>`` id 1 (appended to every sequence) and ``<unk>`` id 2, as in T5. Its vocabulary is
    :func:`t5_vocab`. It saves with ``save_pretrained`` (``tokenizer.json``) and reloads with ``from_pretrained`` or
    ``AutoTokenizer``. A cached instance: do not modify it.
    """
    return _t5_tokenizer(int(model_max_length))


# --------------------------------------------------------------------------------------------------- components

def _clip_text(seed: int, tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None,
               with_projection: bool = False, hidden_act: str = "quick_gelu"):
    """A tiny CLIP text encoder over the tokenizer's whole vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
        projection_dim=projection or hidden, layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_text(seed: int, tokenizer, d_model: int = 32, layers: int = 2, heads: int = 4):
    """A tiny T5 v1.1 encoder (gated GELU, untied embeddings), like the T5-XXL encoder of SD3, Flux and PixArt."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae(seed: int, **latent):
    """A two-block AutoencoderKL (scale factor 2) with the given latent statistics."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS), block_out_channels=_VAE_CHANNELS,
        layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION, **latent).eval()


# --------------------------------------------------------------------------------------------------- families

def tiny_sd(prediction_type: str = "epsilon", seed: int = 0):
    """A tiny ``StableDiffusionPipeline`` (SD 1.x layout, DDIM, full CLIP tokenizer, :data:`RESOLUTION` px).

    ``prediction_type="v_prediction"`` is the SD 2.x case. Built by :func:`memaudit.testing.tiny_pipeline`.
    """
    from memaudit.testing import tiny_pipeline

    return tiny_pipeline(prediction_type=prediction_type, resolution=RESOLUTION, seed=seed,
                         max_length=CLIP_MAX_LENGTH)


def tiny_sdxl(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline``: CLIPTextModel + CLIPTextModelWithProjection (hidden 16 each, so a
    32-wide cross attention context and a 16-wide pooled embedding), a two-level UNet with SDXL's ``text_time``
    added conditioning, SDXL's EulerDiscreteScheduler, a 4-channel VAE with scaling factor 0.13025."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, hidden=16, layers=2, heads=2)
    text_encoder_2 = _clip_text(seed, tokenizer, hidden=16, layers=2, heads=2, projection=16, with_projection=True,
                                hidden_act="gelu")
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=_LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        norm_num_groups=4).eval()
    return StableDiffusionXLPipeline(
        vae=_vae(seed, **_SDXL_VAE), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False)


def tiny_sd3(seed: int = 0):
    """A tiny ``StableDiffusion3Pipeline``: an SD3Transformer2DModel (2 joint blocks, patch 2), CLIP-L (hidden 8)
    and CLIP-G (hidden 16), both with projection, a T5 encoder (d_model 32: the CLIP states, 24 wide, are zero-padded
    to it as in SD3), FlowMatchEulerDiscreteScheduler (shift 3) and a 16-channel VAE with SD3's shift/scaling."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    tokenizer_3 = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, hidden=8, layers=2, heads=2, with_projection=True)
    text_encoder_2 = _clip_text(seed, tokenizer, hidden=16, layers=2, heads=2, with_projection=True,
                                hidden_act="gelu")
    text_encoder_3 = _t5_text(seed, tokenizer_3)
    heads, head_dim = 2, 8
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=_LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=text_encoder_3.config.d_model,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=2 * _LATENT_SIZE).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_SD3_SCHEDULER), vae=_vae(seed, **_SD3_VAE),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=None, feature_extractor=None)


def tiny_flux(variant: str = "dev", seed: int = 0):
    """A tiny ``FluxPipeline`` of the ``"dev"`` (guidance-distilled: guidance embedding, dynamic shifting) or
    ``"schnell"`` (no guidance embedding, shift 1) variant: FluxTransformer2DModel (1 double + 1 single block,
    64 packed input channels), a CLIP text model (pooled, hidden 16), a T5 encoder (d_model 32) and a 16-channel
    VAE with Flux's shift/scaling. Pass ``height``/``width`` (:data:`RESOLUTION`) when calling it: Flux's own
    default is 256 px here."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if variant not in _FLUX_SCHEDULERS:
        raise ValueError(f"Flux variant {variant!r} is not one of {', '.join(_FLUX_SCHEDULERS)}")
    tokenizer = clip_tokenizer(CLIP_MAX_LENGTH)
    tokenizer_2 = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = _clip_text(seed, tokenizer, hidden=16, layers=2, heads=2)
    text_encoder_2 = _t5_text(seed, tokenizer_2)
    latent_channels = _FLUX_VAE["latent_channels"]
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model,
        pooled_projection_dim=text_encoder.config.hidden_size, guidance_embeds=variant == "dev",
        axes_dims_rope=(4, 4, 8)).eval()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**_FLUX_SCHEDULERS[variant]),
        vae=_vae(seed, **_FLUX_VAE), text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, image_encoder=None, feature_extractor=None)


def tiny_pixart_sigma(seed: int = 0):
    """A tiny ``PixArtSigmaPipeline``: PixArtTransformer2DModel (2 blocks, patch 2, adaLN-single, learned sigma:
    8 output channels for 4 latent ones), a T5 encoder (d_model 32), DPMSolverMultistepScheduler and a 4-channel VAE
    with the SDXL VAE's scaling factor. Call it with ``use_resolution_binning=False``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = _t5_text(seed, tokenizer)
    heads, head_dim = 2, 8
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=_LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=head_dim, num_attention_heads=heads,
        in_channels=4, out_channels=8, cross_attention_dim=heads * head_dim,
        caption_channels=text_encoder.config.d_model, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=_vae(seed, **_SDXL_VAE),
        scheduler=DPMSolverMultistepScheduler(**_PIXART_SCHEDULER))


_BUILDERS = {
    "sd": lambda **kw: tiny_sd(prediction_type="epsilon", **kw),
    "sd2": lambda **kw: tiny_sd(prediction_type="v_prediction", **kw),
    "sdxl": tiny_sdxl,
    "sd3": tiny_sd3,
    "flux-dev": lambda **kw: tiny_flux(variant="dev", **kw),
    "flux-schnell": lambda **kw: tiny_flux(variant="schnell", **kw),
    "pixart-sigma": tiny_pixart_sigma,
}


def tiny_family(name: str, **kw):
    """The tiny pipeline of family ``name`` (one of :data:`FAMILY_NAMES`); ``kw`` goes to its builder (``seed``)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model family {name!r}; choose one of {', '.join(FAMILY_NAMES)}")
    return _BUILDERS[name](**kw)


# --------------------------------------------------------------------------------------------------- calling them

def default_resolution(pipe) -> int:
    """The pixel size a tiny pipeline is meant to generate (height = width).

    For UNet pipelines and SD3/PixArt-Sigma this is the pipeline's own default (``sample_size`` times the VAE scale
    factor); Flux's own default ignores the model (128 latents), so for it the VAE's ``sample_size`` is used, which
    the tiny builders set to :data:`RESOLUTION`.
    """
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if type(pipe).__name__.startswith("Flux"):
        return int(pipe.vae.config.sample_size)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return int(denoiser.config.sample_size) * scale


def call_kwargs(pipe_or_name) -> dict:
    """Keyword arguments to pass when calling a tiny pipeline (given as a pipeline or a family name) to get the images
    memaudit samples: ``height`` and ``width`` (:func:`default_resolution`), and for PixArt ``max_sequence_length``
    (:data:`T5_MAX_LENGTH`), ``use_resolution_binning=False`` and ``clean_caption=False``. SD3 and Flux need no
    ``max_sequence_length``: memaudit uses their pipelines' defaults."""
    if isinstance(pipe_or_name, str):
        if pipe_or_name not in _BUILDERS:
            raise ValueError(f"unknown model family {pipe_or_name!r}; choose one of {', '.join(FAMILY_NAMES)}")
        kind = {"sd": "StableDiffusion", "sd2": "StableDiffusion", "sdxl": "StableDiffusionXL", "sd3": "StableDiffusion3",
                "flux-dev": "Flux", "flux-schnell": "Flux", "pixart-sigma": "PixArtSigma"}[pipe_or_name]
        size = RESOLUTION
    else:
        kind = type(pipe_or_name).__name__.removesuffix("Pipeline")
        size = default_resolution(pipe_or_name)
    kw = {"height": size, "width": size}
    if kind in ("PixArtSigma", "PixArtAlpha"):
        kw["max_sequence_length"] = T5_MAX_LENGTH
        kw["use_resolution_binning"] = False
        kw["clean_caption"] = False  # cleaning needs bs4 and ftfy; without them the pipeline warns and skips it
    return kw
