"""What every model family provides.

A *family* (one file each in this package: Stable Diffusion 1.x/2.x, SDXL, SD3, Flux, PixArt) knows, for its
diffusers pipeline class:

- which components the pipeline folder holds and which class each must be (:attr:`Family.components`);
- how to encode prompts into one :class:`Conditioning` (every tensor the denoiser needs, batch-first, so it can be
  cached per prompt, concatenated and sliced), including the unconditional (empty-prompt) one the pipeline itself
  uses for classifier-free guidance;
- how to call its denoiser on latents ``[B, C, H, W]`` (packing them first where the family packs, as Flux does)
  and turn the output into a noise prediction (eps) and a velocity;
- how to noise a clean latent at a timestep and what the training target is (DDPM-style families: ``alpha_bar``;
  flow-matching families: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``);
- how images become scaled (and shifted) latents and back;
- which blocks the denoiser has, and which of them are transformer blocks (the mask units of the PEFT methods);
- how a LoRA trained on its denoiser is saved for its pipeline to load.

Timesteps are always in the scheduler's units: integers in ``[0, num_train_timesteps)`` for DDPM-style families,
``sigma * num_train_timesteps`` for flow-matching ones.

Sampling (:func:`memaudit.families.pipeline.sample`) drives the family's own diffusers pipeline and reads the
denoising strength on the way; see :mod:`memaudit.families.pipeline`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from memaudit.core.errors import TargetError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

__all__ = ["PREDICTION_TYPES", "call_default", "output_to_eps", "training_target", "Conditioning", "Family",
           "FlowMatchingFamily", "DDPMFamily", "alpha_bar_at", "nonfinite_prediction_error", "pack_2x2", "unpack_2x2"]


@dataclass
class Conditioning:
    """Everything a denoiser needs from the prompts: named tensors, batch-first (``prompt_embeds``, pooled
    embeddings, attention masks). The names are the diffusers pipeline's own keyword arguments, so
    ``pipe(**cond.tensors)`` passes them, and ``negative_<name>`` their unconditional counterparts."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index) -> Conditioning:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    @property
    def embeds(self) -> torch.Tensor:
        """The main sequence embedding (``prompt_embeds``)."""
        return self.tensors["prompt_embeds"]

    def replace(self, **tensors: torch.Tensor) -> Conditioning:
        return Conditioning({**self.tensors, **tensors})

    @staticmethod
    def cat(parts: Iterable[Conditioning]) -> Conditioning:
        parts = list(parts)
        return Conditioning({k: torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})

    def repeat(self, n: int) -> Conditioning:
        """A batch of one repeated ``n`` times (views, no copy)."""
        return Conditioning({k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved to ``device``; floating tensors cast to ``dtype`` (masks and ids keep theirs)."""
        return Conditioning({k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                             for k, v in self.tensors.items()})

    def detach(self) -> Conditioning:
        return Conditioning({k: v.detach() for k, v in self.tensors.items()})

    def negative(self) -> dict[str, torch.Tensor]:
        """The tensors as the pipeline's unconditional keyword arguments (``negative_prompt_embeds``, ...)."""
        return {f"negative_{k}": v for k, v in self.tensors.items()}


def call_default(pipe, parameter: str, fallback: Any) -> Any:
    """The default of ``parameter`` in the signature of the pipeline's ``__call__`` (e.g. ``max_sequence_length``:
    what a plain ``pipe(prompt)`` uses), or ``fallback`` when the signature has no such parameter or no default."""
    param = inspect.signature(type(pipe).__call__).parameters.get(parameter)
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return fallback
    return param.default


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``alpha_bar`` at timesteps ``t`` (float32, on ``t``'s device): exact at integer timesteps, linear between
    them (Euler-type schedulers may pass fractional ones)."""
    ac = alphas_cumprod.float().to(t.device)
    tf = t.float().clamp(0, len(ac) - 1)
    lo = tf.floor().long()
    hi = torch.clamp(lo + 1, max=len(ac) - 1)
    w = tf - lo.float()
    return ac[lo] * (1 - w) + ac[hi] * w


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` latents as ``[B, H/2 * W/2, 4C]`` tokens of 2x2 patches (Flux's packing)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_2x2` for latents of ``h x w``."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Family:
    """One model family. Subclasses fill the class attributes and the methods marked *family*; the rest is shared.

    Methods take the diffusers pipeline (``pipe``) that holds the family's components.
    """

    name: ClassVar[str] = ""
    #: human-readable, for messages and the report
    title: ClassVar[str] = ""
    #: the diffusers pipeline classes (``model_index.json``'s ``_class_name``) this family loads
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: component -> accepted class names (a prefix match); every one must be present
    components: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: components a pipeline may have but memaudit does not load (passed as None)
    optional_none: ClassVar[tuple[str, ...]] = ()
    #: the denoiser's component name
    denoiser_name: ClassVar[str] = "unet"
    #: the text encoders, first the one whose tokenizer random word addition and token attribution use
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    #: False when the pipeline makes no unconditional prediction (guidance-distilled): the score costs extra calls
    classifier_free_guidance: ClassVar[bool] = True
    #: keyword arguments always passed to the pipeline's ``__call__`` (e.g. a text length)
    call_kwargs: ClassVar[dict[str, Any]] = {}
    #: True when the denoiser takes the sampling guidance as an input (guidance-distilled Flux dev): then
    #: ``denoise`` accepts ``guidance=`` and direct calls pass the sampler's guidance
    embedded_guidance: ClassVar[bool] = False
    #: True for pipelines audited by their images only (:mod:`memaudit.families.blackbox`)
    black_box: ClassVar[bool] = False

    # -- loading -------------------------------------------------------------------------------------------------
    def build_pipeline(self, cls, parts: dict[str, Any], index: dict | None = None):
        """The pipeline object from loaded components; ``index`` is the folder's ``model_index.json`` (its
        pipeline settings, e.g. SDXL's ``force_zeros_for_empty_prompt``). *family* may add fixed arguments."""
        return cls(**parts, **{k: None for k in self.optional_none})

    # -- facts ---------------------------------------------------------------------------------------------------
    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    def module_names(self, pipe) -> list[str]:
        """The pipeline's torch modules by component name, the denoiser first."""
        return [self.denoiser_name, "vae", *self.text_encoder_names]

    def image_channels(self, pipe) -> int:
        return int(pipe.vae.config.in_channels)

    def vae_scale_factor(self, pipe) -> int:
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def resolution(self, pipe) -> int:
        """Side of the images the pipeline generates by default, in pixels (*family* when not ``sample_size``)."""
        size = self.denoiser(pipe).config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor(pipe)

    def latent_shape(self, pipe, resolution: int) -> tuple[int, int, int]:
        """Unpacked latent shape ``(C, H, W)`` of an image of ``resolution`` pixels."""
        side = resolution // self.vae_scale_factor(pipe)
        return (int(pipe.vae.config.latent_channels), side, side)

    def prediction_type(self, pipe) -> str:
        return "flow" if self.flow else pipe.scheduler.config.get("prediction_type", "epsilon")

    flow: ClassVar[bool] = False

    def num_train_timesteps(self, pipe) -> int:
        return int(pipe.scheduler.config.num_train_timesteps)

    def blocks(self, denoiser: torch.nn.Module) -> list[str]:
        """The denoiser's blocks (module names), in forward order: its transformer blocks (a DiT), or the top-level
        blocks that hold them (a UNet's down, mid and up blocks)."""
        return [n for n, _ in denoiser.named_children()]

    def transformer_blocks(self, denoiser: torch.nn.Module) -> list[str]:
        """The denoiser's transformer blocks (module names), in forward order: one unit each of the PEFT methods'
        block granularity. Default: :meth:`blocks` (a DiT's blocks are its transformer blocks); *family* where its
        blocks hold them (a UNet's ``Transformer2DModel`` modules)."""
        return self.blocks(denoiser)

    # -- prompts -------------------------------------------------------------------------------------------------
    def encode(self, pipe, prompts: list[str], device: torch.device) -> Conditioning:  # pragma: no cover - abstract
        """*family*: the conditioning of ``prompts`` (gradient flows when enabled)."""
        raise TargetError(f"{type(self).__name__} does not encode prompts")

    def tokenize(self, pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The first text encoder's ``input_ids`` and ``attention_mask`` for ``prompts``, exactly as :meth:`encode`
        feeds them to it (token attribution reads them beside that encoder's input embeddings). Default: the first
        tokenizer, padded and truncated to its ``model_max_length``, as the CLIP encoders of SD, SDXL, SD3 and Flux
        are fed; *family* overrides where its pipeline preprocesses the text or uses another length."""
        tokenizer = getattr(pipe, self.tokenizer_names[0])
        tok = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        return {"input_ids": tok.input_ids, "attention_mask": tok.attention_mask}

    def unconditional(self, pipe, device: torch.device) -> Conditioning:
        """The unconditional conditioning the pipeline uses for guidance, batch of one (*family* may override,
        e.g. SDXL's zeros). Default: the empty prompt."""
        return self.encode(pipe, [""], device)

    # -- the denoiser ----------------------------------------------------------------------------------------------
    def denoise(self, pipe, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:  # pragma: no cover
        """*family*: the denoiser's raw output for unpacked latents ``x`` ``[B, C, H, W]`` at timesteps ``t`` ``[B]``
        (scheduler units), as unpacked ``[B, C, H, W]`` in the model's own prediction type."""
        raise TargetError(f"{type(self).__name__} does not call its denoiser")

    def to_eps(self, pipe, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """*family*: the noise prediction (float32) from the denoiser output at ``x``, ``t``."""
        raise TargetError(f"{type(self).__name__} does not convert outputs")

    def score_output(self, pipe, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The space in which the denoising strength ``||c - u||`` is measured (float32): eps by default."""
        return self.to_eps(pipe, output, x, t)

    def add_noise(self, pipe, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise TargetError(f"{type(self).__name__} does not noise latents")

    def training_target(self, pipe, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise TargetError(f"{type(self).__name__} has no training target")

    def sample_timesteps(self, pipe, n: int, generator: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise TargetError(f"{type(self).__name__} does not sample timesteps")

    def pure_noise_timestep(self, pipe) -> torch.Tensor:
        """The timestep at which ``x_t`` is pure noise (the first sampling step's, for the training-time score)."""
        return torch.tensor([self.num_train_timesteps(pipe) - 1])

    # -- latents ---------------------------------------------------------------------------------------------------
    def latent_scaling(self, pipe) -> tuple[float, float]:
        """``(scaling_factor, shift_factor)``: latent = (posterior - shift) * scaling."""
        cfg = pipe.vae.config
        return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)

    def initial_latents(self, pipe, seeds: Sequence[int], resolution: int) -> torch.Tensor:
        """What the pipeline draws from ``generator=[torch.Generator().manual_seed(s) for s in seeds]``, before any
        scaling by ``init_noise_sigma``, in the form its ``latents=`` argument takes (packed for Flux)."""
        shape = self.latent_shape(pipe, resolution)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def first_step(self, pipe, latents: torch.Tensor, steps: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's input at the first sampling step, unpacked ``[B, C, H, W]``, and its timestep (scheduler
        units), for ``latents`` as :meth:`initial_latents` gives them."""
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        t = sched.timesteps[0]
        x = latents * getattr(sched, "init_noise_sigma", 1.0)
        return sched.scale_model_input(x, t), t

    def sampling_timesteps(self, pipe, latents: torch.Tensor, steps: int) -> torch.Tensor:
        """The pipeline's timesteps for ``steps`` steps, first to last (scheduler units). *family* overrides it where
        the pipeline sets them otherwise (a shift that depends on the image size)."""
        sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
        sched.set_timesteps(steps)
        return sched.timesteps

    def cross_attention_layers(self, denoiser: torch.nn.Module) -> list[str]:
        """The denoiser's cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``: image queries,
        text keys) in the order a forward pass runs them (a UNet's down blocks, middle block, up blocks). Empty for a
        denoiser whose text attention is joint (SD3's and Flux's MM-DiT blocks attend over text and image tokens in
        one softmax, so no attention distribution over the text tokens alone exists)."""
        names = [name for name, m in denoiser.named_modules()
                 if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)]
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        return sorted(names, key=lambda name: stage.get(name.split(".")[0], 0))  # stable: block order kept

    def unpacked(self, pipe, x: torch.Tensor, resolution: int) -> torch.Tensor:
        """A denoiser input or output as the hook sees it, as latents ``[B, C, H, W]`` (*family*: Flux packs
        them)."""
        return x

    # -- the hook's view of a denoiser call ------------------------------------------------------------------------
    def call_parts(self, pipe, args: tuple, kwargs: dict, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """*family*: from one denoiser call inside the pipeline: its latent input, timestep (scheduler units, ``[B]``)
        and output (raw, as the pipeline uses it), all possibly packed."""
        raise TargetError(f"{type(self).__name__} cannot read denoiser calls")  # pragma: no cover

    def recall(self, pipe, module, args: tuple, kwargs: dict, uncond: Conditioning):
        """*family*: the same denoiser call with the conditioning replaced by ``uncond`` (batch matching);
        returns the raw output."""
        raise TargetError(f"{type(self).__name__} cannot repeat denoiser calls")  # pragma: no cover

    def pipeline_kwargs(self, cond: Conditioning, uncond: Conditioning | None) -> dict[str, Any]:
        kw = dict(cond.tensors)
        if uncond is not None and self.classifier_free_guidance:
            kw.update(uncond.negative())
        return {**self.call_kwargs, **kw}

    def ready(self, pipe) -> str | None:
        """Why this pipeline cannot be audited as the family (None when it can)."""
        return None

    # -- saving ----------------------------------------------------------------------------------------------------
    def save_lora(self, pipe, layers: dict[str, torch.Tensor], adapter_config, folder: Path) -> None:
        """Write a LoRA trained on the denoiser to the existing ``folder``, for the family's own pipeline class to
        load: ``layers`` is the denoiser's peft LoRA state dict, ``adapter_config`` its ``peft`` ``LoraConfig``.

        Default: diffusers' LoRA format, written by the pipeline class's ``save_lora_weights``, so
        ``pipe.load_lora_weights(folder)`` applies it without memaudit. A pipeline without a LoRA loader (PixArt)
        gets a peft adapter folder instead (``adapter_config.json`` + ``adapter_model.safetensors``:
        ``peft.PeftModel.from_pretrained(pipe.transformer, folder)``, or ``--lora``)."""
        if hasattr(type(pipe), "save_lora_weights"):
            kind = "unet" if self.denoiser_name == "unet" else "transformer"
            type(pipe).save_lora_weights(str(folder), **{f"{kind}_lora_layers": layers}, safe_serialization=True)
        else:
            from safetensors.torch import save_file  # safetensors: only needed when a LoRA is saved

            adapter_config.save_pretrained(str(folder))
            save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in layers.items()},
                      str(folder / "adapter_model.safetensors"))


class DDPMFamily(Family):
    """Families whose scheduler noises with ``alpha_bar`` (epsilon, v or sample prediction)."""

    def alphas_cumprod(self, pipe) -> torch.Tensor:
        sched = pipe.scheduler
        ac = getattr(sched, "alphas_cumprod", None)
        if ac is None:
            raise TargetError(f"{type(sched).__name__} has no alphas_cumprod; use a DDPM-type scheduler.")
        return ac.float()

    def alpha_bar(self, pipe, t: torch.Tensor) -> torch.Tensor:
        return alpha_bar_at(self.alphas_cumprod(pipe), torch.as_tensor(t).reshape(-1))

    def to_eps(self, pipe, output, x, t):
        pt = self.prediction_type(pipe)
        if pt == "epsilon":
            return output.float()
        a = self.alpha_bar(pipe, t.to(x.device)).expand(x.shape[0]) if t.numel() == 1 else self.alpha_bar(pipe, t.to(x.device))
        return output_to_eps(output, x, a, pt)

    def add_noise(self, pipe, x0, noise, t):
        a = self.alpha_bar(pipe, t).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, pipe, x0, noise, t):
        return training_target(x0, noise, self.alpha_bar(pipe, t).to(x0.device), self.prediction_type(pipe))

    def ready(self, pipe) -> str | None:
        pt = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES:
            return f"scheduler prediction_type {pt!r} is not one of {', '.join(PREDICTION_TYPES)}."
        if getattr(pipe.scheduler, "alphas_cumprod", None) is None:
            return f"its scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod; use a DDPM-type scheduler."
        return None

    def sample_timesteps(self, pipe, n, generator):
        return torch.randint(0, self.num_train_timesteps(pipe), (n,), generator=generator)


class FlowMatchingFamily(Family):
    """Rectified-flow families (SD3, Flux): ``x_t = (1 - s) x0 + s noise``, the denoiser predicts the velocity
    ``v = noise - x0``, so ``eps = x_t + (1 - s) v``. Timesteps are ``s * num_train_timesteps``.

    Training draws ``s`` from the logit-normal distribution (mean 0, std 1) of Esser et al. (SD3; the default of
    diffusers' SD3 training scripts, ``compute_density_for_timestep_sampling("logit_normal")``), shifted by the
    scheduler's static shift as those scripts do through the scheduler's initial timesteps; under dynamic
    (resolution-dependent) shifting (Flux dev) the scripts' timesteps carry no shift, so neither do ours. (diffusers'
    Flux DreamBooth scripts default to uniform sampling; we use logit-normal for every flow model.)

    The denoising strength is measured on the velocity, not on eps: ``eps = x_t + (1 - s) v`` makes
    ``eps_c - eps_u = (1 - s)(v_c - v_u)``, identically zero at the first sampling step (``s = 1``, where the score
    detects best) and a fixed multiple of the velocity difference at every other step."""

    flow = True

    def sigma(self, pipe, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t).float().reshape(-1) / self.num_train_timesteps(pipe)

    def to_eps(self, pipe, output, x, t):
        s = self.sigma(pipe, t.to(x.device)).reshape(-1, *([1] * (x.ndim - 1)))
        return x.float() + (1 - s) * output.float()

    def score_output(self, pipe, output, x, t):
        """The velocity: ``eps = x_t + (1 - s) v`` makes ``eps_c - eps_u = (1 - s)(v_c - v_u)``, identically 0 at
        the first sampling step (s = 1) and a constant multiple of the velocity difference at any other."""
        return output.float()

    def add_noise(self, pipe, x0, noise, t):
        s = self.sigma(pipe, t).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))
        return (1 - s) * x0 + s * noise

    def training_target(self, pipe, x0, noise, t):
        return noise - x0

    def sample_timesteps(self, pipe, n, generator):
        u = torch.sigmoid(torch.randn(n, generator=generator))
        cfg = pipe.scheduler.config
        # diffusers' training scripts take sigmas from the scheduler's initial timesteps, which carry the static
        # shift but no shift at all under dynamic (resolution-dependent) shifting (Flux dev)
        shift = 1.0 if cfg.get("use_dynamic_shifting", False) else float(cfg.get("shift", 1.0) or 1.0)
        s = shift * u / (1 + (shift - 1) * u)
        return s * self.num_train_timesteps(pipe)

    def pure_noise_timestep(self, pipe) -> torch.Tensor:
        return torch.tensor([float(self.num_train_timesteps(pipe))])


def output_to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a UNet output to a noise (epsilon) prediction.

    With ``x_t = sqrt(a) x0 + sqrt(1-a) eps`` and ``a = alpha_bar_t`` (one value per batch element):
    epsilon models predict eps; v models predict ``v = sqrt(a) eps - sqrt(1-a) x0``, so
    ``eps = sqrt(a) v + sqrt(1-a) x_t``; sample models predict x0, so ``eps = (x_t - sqrt(a) x0) / sqrt(1-a)``.
    """
    a = alpha_bar.to(device=x_t.device, dtype=torch.float32).reshape(-1, *([1] * (x_t.ndim - 1)))
    out, x = output.float(), x_t.float()
    if prediction_type == "epsilon":
        eps = out
    elif prediction_type == "v_prediction":
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    elif prediction_type == "sample":
        eps = (x - a.sqrt() * out) / (1 - a).sqrt()
    else:
        raise TargetError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}.")
    return eps


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output for clean latents ``x0`` noised with ``noise`` (the inverse of the above)."""
    a = alpha_bar.to(device=x0.device, dtype=x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise TargetError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}.")


def nonfinite_prediction_error(model: str, dtype: torch.dtype, nan: bool = True) -> TargetError:
    """The one-line error for a denoiser whose first prediction is not finite: the model's fault, not the images'."""
    what = "NaN" if nan else "infinite values"
    low = dtype in (torch.float16, torch.bfloat16)
    why = (f"its weights are broken or overflow in {str(dtype).removeprefix('torch.')}; load it in float32 "
           "(--dtype float32) or check the checkpoint and its LoRA adapters" if low else
           "its weights (or its LoRA adapters') are broken; check the checkpoint")
    return TargetError(f"{model} predicts {what} at the first sampling step: {why}. Sampling stopped.")
