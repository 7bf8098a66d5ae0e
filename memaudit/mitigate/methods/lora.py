"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), through the ``peft`` library.

Each attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) gets a rank-4 update ``W' = W + (alpha/r) B A``
(``r = lora_alpha = 4``; ``B`` starts at 0, so the freshly adapted UNet is the base model exactly), injected with
``peft.inject_adapter_in_model`` (offline, no hub access). Only ``lora_A`` and ``lora_B`` train. ``A``'s random
initialization is drawn from a fixed seed in a forked RNG, so building the method is deterministic and leaves the
global random state alone.

A layer unit is the adapted layer (its ``lora_A`` and ``lora_B`` together: training ``A`` alone while ``B = 0`` would
do nothing). :meth:`merge` fuses every update into its base weight and puts the plain ``Linear`` back. Learning rate
1e-4 (our choice, the usual Stable Diffusion LoRA rate).
"""

from __future__ import annotations

import torch

from memaudit.mitigate.methods.base import PEFTMethod, replace_module

RANK = 4
ALPHA = 4
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
ADAPTER_NAME = "default"
INIT_SEED = 0


class LoRA(PEFTMethod):
    """Rank-4 LoRA on the attention projections, via peft; see the module docstring."""

    name = "lora"
    default_lr = 1e-4
    description = f"rank-{RANK} LoRA on the attention projections ({', '.join(TARGET_MODULES)}), via peft"

    def _install(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), init_lora_weights=True)
        device = next(self.unet.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(INIT_SEED)
            inject_adapter_in_model(config, self.unet, adapter_name=ADAPTER_NAME)

    def _trainable_names(self) -> list[str]:
        return [n for n, _ in self.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def _layer_of(self, param_name: str) -> str:
        return param_name.split(".lora_", 1)[0]

    def _merge(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [(n, m) for n, m in self.unet.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, layer in layers:
            layer.merge()
            replace_module(self.unet, name, layer.get_base_layer())
        if "peft_config" in self.unet.__dict__:  # set by peft's injection
            del self.unet.peft_config
        if getattr(self.unet, "_hf_peft_config_loaded", False):
            self.unet._hf_peft_config_loaded = False
