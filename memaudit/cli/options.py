"""Options the commands share (``Annotated`` aliases, one help text each), and the checks that turn option values
into library arguments: ``--lora``/``--lora-scale`` pairs, comma-separated numbers, ``KEY=VALUE`` options,
``--threads``. A mistake raises :class:`memaudit.core.errors.ConfigError` (one line, exit code 2)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer

from memaudit.core.errors import ConfigError

__all__ = [
    "ConvertChannels",
    "Device",
    "Dtype",
    "FeatureCacheDir",
    "LatentCacheDir",
    "Lora",
    "LoraScale",
    "OutDir",
    "Overwrite",
    "RayAddress",
    "Redact",
    "Seed",
    "Threads",
    "Train",
    "parse_floats",
    "parse_loras",
    "parse_options",
    "use_threads",
    "user_error",
]

ConvertChannels = Annotated[bool, typer.Option(help="convert training images to the model's channels")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda")]
Detectors = Annotated[str, typer.Option(
    "--detectors", help="memorization detectors read during sampling: NAME,NAME,..., all, or default (the free ones; "
                        "`memaudit detectors` lists them)")]
Dtype = Annotated[str, typer.Option(help="float32, float16 or bfloat16")]
FeatureCacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
    help="where the training-feature index is cached for later audits; never inside --out")]
LatentCacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
    help="where training latents are cached for later fine-tunes")]
OutDir = Annotated[Path, typer.Option("--out", help="folder for results (created; files written atomically)")]
Lora = Annotated[list[Path], typer.Option(
    "--lora", help="LoRA adapter applied to the model (a .safetensors file or its folder, as diffusers' "
                   "load_lora_weights reads it); repeatable")]
LoraScale = Annotated[list[float], typer.Option(
    "--lora-scale", help="weight of each --lora (one value for all, or one per --lora; default 1.0)")]
Overwrite = Annotated[bool, typer.Option(help="replace a finished fine-tune in --out")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster for the workers (HOST:PORT, as `ray start --head` prints it); default: a "
                          "local Ray instance")]
Redact = Annotated[bool, typer.Option("--redact", help="leave every training-image pixel out of the outputs")]
Seed = Annotated[int, typer.Option("--seed", help="seed of every random draw")]
Threads = Annotated[int | None, typer.Option(
    "--threads", envvar="MEMAUDIT_THREADS", show_default="the cores this process may use",
    help="CPU threads for torch; give each of several jobs on one machine its share of the cores")]
Train = Annotated[Path, typer.Option("--train", help="training data: a folder or a captions .csv/.jsonl")]


def user_error(message: str) -> ConfigError:
    """The error a command raises for a bad option: :func:`memaudit.cli.app.main` prints it in one line."""
    return ConfigError(message)


def use_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads``, or every core this process may run on (its CPU affinity mask, which
    ``taskset`` and container CPU limits set; torch's own default counts the machine's cores instead)."""
    n = threads if threads is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    if n < 1:
        raise user_error(f"--threads {n} must be at least 1.")
    import torch  # heavy import (torch): see memaudit.cli.app

    torch.set_num_threads(n)
    return n


def parse_loras(paths: list[Path], scales: list[float]) -> list[list]:
    """``--lora``/``--lora-scale`` pairs: one scale for every adapter, or one per adapter."""
    if scales and not paths:
        raise user_error("--lora-scale was given without --lora.")
    if len(scales) > 1 and len(scales) != len(paths):
        raise user_error(f"{len(scales)} --lora-scale values for {len(paths)} --lora adapters; give one value for "
                         "all or one per adapter.")
    bad = [s for s in scales if not math.isfinite(s)]
    if bad:
        raise user_error(f"--lora-scale {bad[0]} is not a finite number; pass one such as 1 or 0.5.")
    scales = scales * len(paths) if len(scales) == 1 else (scales or [1.0] * len(paths))
    return [[str(p), float(s)] for p, s in zip(paths, scales)]


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """Comma-separated numbers of ``option`` (e.g. ``--lr-choices``)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise user_error(f"{option} {text!r} must be comma-separated numbers.") from None


def parse_options(options: list[str]) -> dict:
    """``--feature-option KEY=VALUE`` items as a dict; a VALUE that parses as JSON is read as JSON."""
    parsed = {}
    for item in options:
        if "=" not in item:
            raise user_error(f"--feature-option {item!r} is not KEY=VALUE.")
        k, v = item.split("=", 1)
        try:
            parsed[k.strip()] = json.loads(v)
        except ValueError:
            parsed[k.strip()] = v
    return parsed
