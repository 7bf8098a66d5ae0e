"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), through the ``peft`` library.

Each attention projection gets a rank-4 update ``W' = W + (alpha/r) B A`` (``r = lora_alpha = 4``; ``B`` starts at 0,
so the freshly adapted denoiser is the base model exactly), injected with ``peft.inject_adapter_in_model`` (offline,
no hub access). Only ``lora_A`` and ``lora_B`` train. ``A``'s random initialization is drawn from a fixed seed in a
forked RNG, so building the method is deterministic and leaves the global random state alone.

The adapted layers depend on the denoiser (:func:`lora_targets`, names matched as suffixes of module names, as
``peft`` does): ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` on a UNet (SD 1.x/2.x, SDXL) and PixArt; on SD3 and Flux
also the joint blocks' context-stream projections ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``
(SD3: the default ``--lora_layers`` of diffusers' ``train_dreambooth_lora_sd3.py``; Flux: the attention layers of
``train_dreambooth_lora_flux.py`` (``attn.to_k``, ``attn.to_q``, ``attn.to_v``,
``attn.to_out.0``, ``attn.add_k_proj``, ``attn.add_q_proj``, ``attn.add_v_proj``, ``attn.to_add_out``; its default
also adapts the feed-forwards, which here stay out as on the other families). Flux's single-stream blocks have an
attention without ``to_out``: their ``to_q``, ``to_k``, ``to_v`` are adapted (``proj_mlp``/``proj_out`` are not, as in
that script). Only names that exist in the denoiser are passed to ``peft``.

A layer unit is the adapted layer (its ``lora_A`` and ``lora_B`` together: training ``A`` alone while ``B = 0`` would
do nothing). :meth:`merge` fuses every update into its base weight and puts the plain ``Linear`` back; :meth:`unload`
puts it back without fusing. Learning rate 1e-4 (our choice, the usual Stable Diffusion LoRA rate).

:func:`save_diffusers_lora` writes a trained LoRA (before it is merged) in the format the family's own pipeline
loads (:meth:`memaudit.families.Family.save_lora`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from memaudit.peft.base import PEFTMethod
from memaudit.peft.layers import replace_module

RANK = 4
ALPHA = 4
#: the attention projections adapted on every denoiser
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
#: the context-stream projections of a joint (MMDiT) attention
JOINT_TARGET_MODULES = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
#: denoiser class name -> the layers adapted on it (denoisers not listed: :data:`TARGET_MODULES`)
DENOISER_TARGETS = {"FluxTransformer2DModel": TARGET_MODULES + JOINT_TARGET_MODULES,
                    "SD3Transformer2DModel": TARGET_MODULES + JOINT_TARGET_MODULES}
ADAPTER_NAME = "default"
INIT_SEED = 0


def lora_targets(denoiser: torch.nn.Module) -> list[str]:
    """The ``peft`` target module names for ``denoiser`` (see the module docstring): those of its class (or a base
    class) in :data:`DENOISER_TARGETS`, else :data:`TARGET_MODULES`, keeping only names that match a ``Linear``
    layer of the denoiser."""
    wanted = next((DENOISER_TARGETS[c.__name__] for c in type(denoiser).__mro__ if c.__name__ in DENOISER_TARGETS),
                  TARGET_MODULES)
    linears = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear)]
    return [t for t in wanted if any(n == t or n.endswith("." + t) for n in linears)]


class LoRA(PEFTMethod):
    """Rank-4 LoRA on the attention projections, via peft; see the module docstring."""

    name = "lora"
    default_lr = 1e-4
    description = f"rank-{RANK} LoRA on the attention projections ({', '.join(TARGET_MODULES)}, ...), via peft"

    def _install(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = lora_targets(self.denoiser)
        if not targets:
            return  # nothing to adapt: no units (a denoiser without diffusers attention projections)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=True)
        device = next(self.denoiser.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(INIT_SEED)
            inject_adapter_in_model(config, self.denoiser, adapter_name=ADAPTER_NAME)

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in self.denoiser.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def _layer_of(self, param_name: str) -> str:
        return param_name.split(".lora_", 1)[0]

    def _forget_config(self) -> None:
        if "peft_config" in self.denoiser.__dict__:  # set by peft's injection
            del self.denoiser.peft_config
        if getattr(self.denoiser, "_hf_peft_config_loaded", False):
            self.denoiser._hf_peft_config_loaded = False

    def _merge(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(n, m) for n, m in self.denoiser.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, layer in layers:
            layer.merge()
            replace_module(self.denoiser, name, layer.get_base_layer())
        self._forget_config()

    def _unload(self) -> None:
        super()._unload()  # each peft layer gives back its base layer, unmerged
        self._forget_config()


def save_diffusers_lora(target, folder: Path) -> Path:
    """The LoRA trained on the target's denoiser (before it is merged), written to ``folder`` (created) by the
    target's family (:meth:`memaudit.families.Family.save_lora`): in diffusers' LoRA format, so
    ``pipe.load_lora_weights(folder)`` applies it without memaudit, or as a peft adapter folder for a pipeline with no
    LoRA loader (PixArt)."""
    from peft import get_peft_model_state_dict  # peft: only needed when a LoRA is saved

    layers = get_peft_model_state_dict(target.denoiser, adapter_name=ADAPTER_NAME)
    folder.mkdir(parents=True, exist_ok=True)  # inside the fine-tune's atomic output folder
    target.family.save_lora(target.pipe, layers, target.denoiser.peft_config[ADAPTER_NAME], folder)
    return folder
