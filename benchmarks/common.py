"""What the benchmark scripts share: one row of numbers from an audit and its fine-tune, and a machine line."""

from __future__ import annotations

import platform

import torch


def audit_row(results: dict, finetune: dict | None = None) -> dict:
    """The numbers a benchmark table shows for one audited model: from ``results.json`` of ``memaudit audit`` (with
    ``--heldout`` and ``--alignment``) and, when given, the model's ``memaudit_finetune.json``."""
    s = results["summary"]
    own = [p["own_train_index"] for p in results["prompts"]]
    images = results["images"]
    row = {"prompts": s["n_prompts"], "flagged_prompts": s["flagged_prompts"],
           "extracted_training_images": s["extracted_training_images"], "amd": s["amd"],
           "own_nearest": sum(own[im["prompt_index"]] == im["nearest_train_index"] for im in images) / len(images),
           "denoising_mean": s["denoising_mean"], "kid": s["quality"]["kid"], "kid_std": s["quality"]["kid_std"],
           "fid": s["quality"]["fid"], "alignment": s["alignment"]["mean"], "audit_wall_time_s": s["wall_time_s"],
           "mitigation_summary": s.get("mitigation")}
    if finetune is not None:
        row.update(trainable_percent=finetune["trainable_percent"],
                   trainable_parameters=finetune["trainable_parameters"],
                   finetune_wall_time_s=finetune["result"]["wall_time_s"], finetune_steps=finetune["result"]["steps"])
    return row


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
