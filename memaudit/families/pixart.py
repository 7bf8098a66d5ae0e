"""PixArt-Alpha and PixArt-Sigma: a DiT (``PixArtTransformer2DModel``) conditioned on T5 hidden states under a
DDPM-type scheduler.

Architecture and conventions, as diffusers' ``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline`` use them:

- **Prompts.** One T5 encoder (``T5EncoderModel``; PixArt uses T5-XXL v1.1) encodes the prompt, lower-cased and
  padded to ``max_sequence_length`` tokens, with its attention mask: the conditioning is ``prompt_embeds``
  ``[B, L, D]`` and ``prompt_attention_mask`` ``[B, L]``, and the transformer's cross attention ignores the padding
  (``encoder_attention_mask``). ``L`` is the pipeline's default (120 tokens for PixArt-Alpha, 300 for PixArt-Sigma)
  or the tokenizer's ``model_max_length`` when that is smaller. The unconditional conditioning is the pipeline's
  own: the empty prompt encoded with the same length and its mask (only ``</s>`` attended).
- **Fixed call arguments.** ``use_resolution_binning=False`` (binning only knows the released sample sizes and would
  change the requested resolution) and ``clean_caption=False`` (cleaning needs beautifulsoup4 and ftfy; without
  them the pipeline warns and skips it, so results would depend on what is installed). memaudit encodes prompts
  without cleaning too, so its conditioning is the one the pipeline builds with ``clean_caption=False``.
- **Denoiser.** The transformer takes latents ``[B, C, H, W]`` (it patchifies them itself: no packing here), the
  timestep in scheduler units (integers in ``[0, num_train_timesteps)``) broadcast to the batch, and
  ``added_cond_kwargs``: for PixArt-Sigma always ``resolution=None, aspect_ratio=None``; for PixArt-Alpha, when the
  transformer's ``sample_size`` is 128 (the 1024-px models), the image size in pixels ``[B, 2]`` (height, width)
  and the aspect ratio ``[B, 1]`` (height / width), as the pipeline passes them; otherwise None as well.
- **Learned sigma.** The released models predict the variance too: ``out_channels = 2 * in_channels``, and the
  pipeline keeps the first half as the noise prediction (after guidance, which is linear, so splitting first is the
  same). :meth:`PixArt.denoise` and :meth:`PixArt.to_eps` keep that half; a transformer with ``out_channels ==
  in_channels`` is used as is. The prediction type is the scheduler's (``epsilon`` for PixArt; DPM-Solver++ in the
  released pipelines).
- **Latents.** Scaled by the VAE's ``scaling_factor`` (PixArt-Alpha uses the SD VAE, 0.18215; PixArt-Sigma the
  SDXL VAE, 0.13025), no shift; the pipeline draws them as Stable Diffusion does.
- **Steps.** Plain diffusers' ``PixArtAlphaPipeline`` cannot sample in one step with a DPM-Solver scheduler (for one
  step it takes the second output of ``scheduler.step``, which only one-step schedulers return); use two or more.
- **Score.** With classifier-free guidance the pipeline evaluates the transformer on the doubled batch
  (unconditional first); the hook keeps the eps half of both and their difference's norm is the denoising strength.

The mask units of the PEFT methods are the transformer blocks (``transformer_blocks.0``, ...).
"""

from __future__ import annotations

import torch

from memaudit.families.base import Conditioning, DDPMFamily, call_default
from memaudit.families.tiny import LATENT_SIZE, SDXL_VAE, T5_MAX_LENGTH, t5_text_encoder, t5_tokenizer, tiny_vae

#: max_sequence_length defaults of the pipelines, used when the pipeline's signature does not say
DEFAULT_MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}

# PixArt-Sigma's scheduler configuration (the defaults of DPMSolverMultistepScheduler, which diffusers' conversion
# script uses), for the tiny test pipeline
_PIXART_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++",
                         solver_type="midpoint", lower_order_final=True, timestep_spacing="linspace", steps_offset=0)


def _is_alpha(pipe) -> bool:
    return any(cls.__name__ == "PixArtAlphaPipeline" for cls in type(pipe).__mro__)


class PixArt(DDPMFamily):
    name = "pixart"
    title = "PixArt-Alpha/Sigma"
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    # hub checkpoints of PixArt-Alpha name their transformer Transformer2DModel (diffusers remaps it on loading)
    components = {"transformer": ("PixArtTransformer2DModel", "Transformer2DModel"), "vae": ("AutoencoderKL",),
                  "text_encoder": ("T5EncoderModel",), "tokenizer": ("T5Tokenizer",), "scheduler": ("",)}
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    call_kwargs = {"use_resolution_binning": False, "clean_caption": False}

    # -- prompts -------------------------------------------------------------------------------------------------
    def max_sequence_length(self, pipe) -> int:
        """T5 tokens of the conditioning: the pipeline's default (Alpha 120, Sigma 300), or the tokenizer's
        ``model_max_length`` when smaller."""
        default = call_default(pipe, "max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH[
            "PixArtAlphaPipeline" if _is_alpha(pipe) else "PixArtSigmaPipeline"])
        limit = getattr(pipe.tokenizer, "model_max_length", None)
        return int(min(default, limit)) if isinstance(limit, int) and limit > 0 else int(default)

    def encode(self, pipe, prompts, device):
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device,
                                                clean_caption=False,
                                                max_sequence_length=self.max_sequence_length(pipe))
        return Conditioning({"prompt_embeds": embeds, "prompt_attention_mask": mask})

    def tokenize(self, pipe, prompts):
        """T5 ids and mask as :meth:`encode` makes them: the pipeline's preprocessing without cleaning (lower case,
        stripped), padded and truncated to :meth:`max_sequence_length`."""
        texts = pipe._text_preprocessing(list(prompts), clean_caption=False)
        tok = pipe.tokenizer(texts, padding="max_length", max_length=self.max_sequence_length(pipe), truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask}

    def pipeline_kwargs(self, cond, uncond):
        # the text length the conditioning was encoded with (the pipeline pads its own encodings to it)
        kw = {**super().pipeline_kwargs(cond, uncond), "max_sequence_length": int(cond.embeds.shape[1])}
        if "negative_prompt_embeds" in kw:
            kw["negative_prompt"] = None  # its default "" may not be passed together with negative embeddings
        return kw

    # -- the denoiser ----------------------------------------------------------------------------------------------
    def learned_sigma(self, pipe) -> bool:
        """Whether the transformer also predicts the variance (the pipeline's own test)."""
        cfg = self.denoiser(pipe).config
        return cfg.out_channels // 2 == cfg.in_channels

    def eps_half(self, pipe, output: torch.Tensor) -> torch.Tensor:
        """The noise-prediction channels of a transformer output (the first half under learned sigma)."""
        cfg = self.denoiser(pipe).config
        if self.learned_sigma(pipe) and output.shape[1] == cfg.out_channels:
            return output.chunk(2, dim=1)[0]
        return output

    def passes_micro_conditions(self, pipe) -> bool:
        """Whether the pipeline passes image size and aspect ratio (PixArt-Alpha, transformer sample size 128)."""
        return _is_alpha(pipe) and self.denoiser(pipe).config.sample_size == 128

    def added_cond_kwargs(self, pipe, x: torch.Tensor, dtype: torch.dtype) -> dict:
        """The micro-conditions the pipeline passes for latents ``x`` (PixArt-Alpha 1024-px models: image size and
        aspect ratio in pixels; otherwise None)."""
        if self.passes_micro_conditions(pipe):
            scale = self.vae_scale_factor(pipe)
            height, width = x.shape[-2] * scale, x.shape[-1] * scale
            n = x.shape[0]
            resolution = torch.tensor([height, width]).repeat(n, 1).to(dtype=dtype, device=x.device)
            aspect_ratio = torch.tensor([float(height / width)]).repeat(n, 1).to(dtype=dtype, device=x.device)
            return {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return {"resolution": None, "aspect_ratio": None}

    def denoise(self, pipe, x, t, cond):
        embeds = cond.embeds
        out = self.denoiser(pipe)(
            x, encoder_hidden_states=embeds, encoder_attention_mask=cond.tensors.get("prompt_attention_mask"),
            timestep=t, added_cond_kwargs=self.added_cond_kwargs(pipe, x, embeds.dtype), return_dict=False)[0]
        return self.eps_half(pipe, out)

    def to_eps(self, pipe, output, x, t):
        return super().to_eps(pipe, self.eps_half(pipe, output), x, t)

    # -- the hook's view of a denoiser call ------------------------------------------------------------------------
    def call_parts(self, pipe, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        t = kwargs["timestep"] if "timestep" in kwargs else args[2]
        out = output[0] if isinstance(output, tuple) else output.sample
        return x, torch.as_tensor(t, device=x.device).reshape(-1), out

    def recall(self, pipe, module, args, kwargs, uncond):
        kw = dict(kwargs)
        kw["encoder_hidden_states"] = uncond.embeds.to(kw["encoder_hidden_states"].dtype)
        mask = uncond.tensors.get("prompt_attention_mask")
        kw["encoder_attention_mask"] = mask.to(kw["encoder_attention_mask"].dtype) if (
            mask is not None and kw.get("encoder_attention_mask") is not None) else mask
        out = module(*args, **kw)
        return out[0] if isinstance(out, tuple) else out.sample

    # -- facts -------------------------------------------------------------------------------------------------------
    def blocks(self, denoiser):
        return [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]

    def ready(self, pipe):
        why = super().ready(pipe)
        if why:
            return why
        den = self.denoiser(pipe)
        cfg = den.config
        if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
            return (f"its transformer has {cfg.out_channels} output channels for {cfg.in_channels} latent ones; "
                    f"{self.title} needs as many (or twice as many, with learned sigma).")
        if getattr(den, "use_additional_conditions", False) and not self.passes_micro_conditions(pipe):
            return (f"its transformer takes resolution and aspect-ratio conditions, but {type(pipe).__name__} passes "
                    f"none (only PixArtAlphaPipeline does, for transformers of sample_size 128).")
        return None


# -- the tiny test pipeline ----------------------------------------------------------------------------------------
def tiny(seed: int = 0):
    """A tiny ``PixArtSigmaPipeline``: PixArtTransformer2DModel (2 blocks, patch 2, adaLN-single, learned sigma:
    8 output channels for 4 latent ones), a T5 encoder (d_model 32), DPMSolverMultistepScheduler and a 4-channel VAE
    with the SDXL VAE's scaling factor. Call it with ``use_resolution_binning=False``."""
    from diffusers import (  # diffusers: a measured import cost, paid only for test models
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    tokenizer = t5_tokenizer(T5_MAX_LENGTH)
    text_encoder = t5_text_encoder(seed, tokenizer)
    heads, head_dim = 2, 8
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, num_layers=2, patch_size=2, attention_head_dim=head_dim, num_attention_heads=heads,
        in_channels=4, out_channels=8, cross_attention_dim=heads * head_dim,
        caption_channels=text_encoder.config.d_model, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False).eval()
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=tiny_vae(seed, **SDXL_VAE),
        scheduler=DPMSolverMultistepScheduler(**_PIXART_SCHEDULER))
