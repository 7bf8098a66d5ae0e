"""The ``finetune`` command, and what a stopped fine-tune kept (also for ``memaudit mitigate finetune``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memaudit.cli.options import (
    ConvertChannels,
    Device,
    LatentCacheDir,
    Lora,
    LoraScale,
    Overwrite,
    Seed,
    Threads,
    Train,
    parse_loras,
    use_threads,
    user_error,
)
from memaudit.cli.progress import finetune_callbacks, make_console, progress_display, quiet_loading
from memaudit.core.outputs import partial_dir

__all__ = ["finetune", "finetune_kept"]


def finetune(
    base: Annotated[str, typer.Argument(help="diffusers pipeline folder to fine-tune (or a hub id already in the local cache)")],
    train: Train,
    out: Annotated[Path, typer.Option("--out", help="pipeline folder to write (OUT.partial/ holds checkpoints until done)")],
    method: Annotated[str, typer.Option(help="which parameters train: full, freeze, bias, norm, attention, svdiff, difffit, lora")] = "full",
    granularity: Annotated[str, typer.Option(help="mask units of the method: block or layer")] = "block",
    mask: Annotated[str | None, typer.Option(help="0/1 per unit of the method, e.g. 0110100 (default: all units)")] = None,
    mitigation: Annotated[str, typer.Option(help="training-time mitigation: none, rwa or threshold")] = "none",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate (default: the method's)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 32,
    rwa_words: Annotated[int, typer.Option(help="rwa: random tokens inserted per caption")] = 2,
    rwa_probability: Annotated[float, typer.Option(help="rwa: probability a caption is perturbed at a step")] = 0.5,
    threshold: Annotated[str, typer.Option(help="threshold: strength at/above which samples drop, or auto (top decile)")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="write a resumable checkpoint every N steps")] = 100,
    save_dtype: Annotated[str, typer.Option(help="dtype of the saved denoiser and VAE: float32, float16, bfloat16")] = "float32",
    convert_channels: ConvertChannels = False,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    device: Device = "auto",
    cache_dir: LatentCacheDir = None,
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    threads: Threads = None,
) -> None:
    """Fine-tune BASE on --train data, optionally with a training-time mitigation; resumes after a crash."""
    # heavy import (torch, diffusers): see memaudit.cli.app
    from memaudit.finetune import FinetuneConfig
    from memaudit.finetune import finetune as run_finetune

    use_threads(threads)

    bits = None
    if mask is not None:
        if not mask or set(mask) - {"0", "1"}:
            raise user_error(f"--mask {mask!r} must be a string of 0s and 1s, one per unit of the method (list them "
                             f"with: memaudit mitigate units {base} --method {method} --granularity {granularity}).")
        bits = [int(c) for c in mask]
    config = FinetuneConfig(method=method, granularity=granularity, mask=bits, mitigation=mitigation, steps=steps,
                            learning_rate=lr, batch_size=batch_size,
                            seed=seed, rwa_words=rwa_words, rwa_probability=rwa_probability, threshold=threshold,
                            checkpoint_every=checkpoint_every, save_dtype=save_dtype,
                            loras=parse_loras(lora, lora_scale))
    quiet_loading()
    with progress_display(lambda: finetune_kept(out)) as bar:
        progress, cache_progress = finetune_callbacks(bar)
        settings = run_finetune(base, train, out, config, device=device, convert_channels=convert_channels,
                                overwrite=overwrite, progress=progress, cache_dir=cache_dir,
                                cache_progress=cache_progress)
    _print_finetune(settings, out)


def _print_finetune(settings: dict, out: Path) -> None:
    """What a fine-tune did: the latent cache, the parameters and steps, what a mitigation dropped, the pipeline."""
    r = settings["result"]
    console = make_console()
    cache = settings.get("latent_cache")
    if cache:
        console.print(f"latent cache: {cache['encoded']} image(s) encoded now, {cache['found']} found ({cache['path']})")
    loss = r["mean_loss_last_100"]
    console.print(f"fine-tuned {settings['trainable_parameters']:,} parameters ({settings['trainable_percent']:.2f}% of "
                  f"the denoiser) for {r['steps']} steps in {r['wall_time_s']:.0f} s"
                  + (f"; mean loss of the last 100 steps {loss:.4f}" if loss is not None else ""))
    stats = r["stats"]
    if "threshold_seen" in stats:
        console.print(f"threshold: dropped {stats['threshold_dropped']} of {stats['threshold_seen']} samples, "
                      f"skipped {r['skipped_steps']} steps")
    if "rwa_perturbed" in stats:
        console.print(f"rwa: perturbed {stats['rwa_perturbed']} captions")
    console.print(f"pipeline: {out}")


def finetune_kept(out: Path) -> str | None:
    """What a stopped fine-tune into ``out`` kept on disk, in a sentence (None: nothing)."""
    from memaudit.training import (
        latest_checkpoint,  # heavy import (torch), needed only after Ctrl-C: see memaudit.cli.app
    )

    work = partial_dir(out)
    if not work.is_dir():
        return None
    checkpoint = latest_checkpoint(work / "checkpoints")
    if checkpoint is None:
        return f"No checkpoint was written yet ({work} keeps the settings; one is written every --checkpoint-every steps)."
    return f"Kept the checkpoint {checkpoint} (step {checkpoint.name.split('-')[-1].lstrip('0') or '0'})."
