"""What the benchmark scripts share: one row of numbers from an audit and its fine-tune, and a machine line."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

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


#: audit settings that add scores without changing any other number of the audit (its images, verdicts, AMD,
#: quality): an audit recorded before them, or with others, still stands for a table's row
ADDS_SCORES_ONLY = ("detectors",)


def same_audit_settings(recorded: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> bool:
    """Whether an audit recorded with settings ``recorded`` (its results.json's) gives the numbers an audit with
    ``wanted`` (``AuditConfig.to_dict()`` through JSON) would, leaving out ``ignore`` and :data:`ADDS_SCORES_ONLY`."""
    skip = set(ignore) | set(ADDS_SCORES_ONLY)
    return all(recorded.get(k) == v for k, v in wanted.items() if k not in skip)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: ``line`` for printing, and the details."""
    import faiss

    info: dict[str, Any] = {"device": device, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
                            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["line"] = f"{info['gpu']} (host CPU {info['cpu']}, {info['cpu_count']} cores)"
    else:
        info["line"] = (f"{info['cpu']} ({platform.machine()}, {info['cpu_count']} cores), torch {info['torch_threads']}"
                        f" threads, faiss {info['faiss_threads']} threads"
                        + (f", OMP_NUM_THREADS={info['OMP_NUM_THREADS']}" if info["OMP_NUM_THREADS"] else ""))
    return info


def machine(device: str) -> str:
    """One line naming what the numbers were measured on."""
    return machine_info(device)["line"]


# how a benchmark table shows each number of an audit_row
FORMATS: dict[str, Callable[[dict], str]] = {
    "name": lambda r: r["name"],
    "trainable": lambda r: f"{r['trainable_percent']:.3f}",
    "extracted": lambda r: f"**{r['extracted_training_images']}**",
    "flagged": lambda r: str(r["flagged_prompts"]),
    "amd": lambda r: f"{r['amd']:.4f}",
    "own": lambda r: f"{100 * r['own_nearest']:.0f}%",
    "denoising": lambda r: f"{r['denoising_mean']:.3f}",
    "kid": lambda r: f"{r['kid']:.3f} ± {r['kid_std']:.3f}",
    "fid": lambda r: f"{r['fid']:.2f}",
    "alignment": lambda r: f"{r['alignment']:.3f}",
}


def markdown_table(rows: list[dict], columns: list[tuple[str, str | Callable[[dict], str]]]) -> str:
    """A Markdown table: one column per ``(header, FORMATS key or function of the row)``."""
    cells = [[FORMATS[f](r) if isinstance(f, str) else f(r) for _, f in columns] for r in rows]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
