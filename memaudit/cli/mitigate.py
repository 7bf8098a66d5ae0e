"""``memaudit mitigate``: MemControl's mask search, the fine-tune with a searched mask, the export of an adapter, and
the list of a method's mask units."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memaudit.cli.finetune import finetune_kept
from memaudit.cli.options import (
    ConvertChannels,
    Device,
    LatentCacheDir,
    Lora,
    LoraScale,
    OutDir,
    Overwrite,
    RayAddress,
    Seed,
    Threads,
    Train,
    parse_floats,
    parse_loras,
    use_threads,
    user_error,
)
from memaudit.cli.progress import finetune_callbacks, make_console, progress_display, quiet_loading, run_with_progress

__all__ = ["mitigate_app", "mitigate_export", "mitigate_finetune", "mitigate_search", "mitigate_units"]

mitigate_app = typer.Typer(help="MemControl: search for the parameters that can be tuned without memorizing.",
                           no_args_is_help=True, rich_markup_mode=None)


@mitigate_app.command("search")
def mitigate_search(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder to fine-tune")],
    train: Train,
    method: Annotated[str, typer.Option(help="PEFT method whose units the mask switches: full, freeze, bias, norm, attention, svdiff, difffit, lora")] = "svdiff",
    granularity: Annotated[str, typer.Option(help="block (one unit per transformer block, plus the rest) or layer")] = "block",
    population: Annotated[int, typer.Option(help="NSGA-II population")] = 8,
    generations: Annotated[int, typer.Option(help="NSGA-II generations")] = 4,
    inner_steps: Annotated[int, typer.Option(help="fine-tuning steps per evaluation")] = 200,
    schedule: Annotated[str, typer.Option(help="plain, or screen: search on short fine-tunes (--screen-steps), then "
                                               "train only the screening front for --inner-steps")] = "plain",
    screen_steps: Annotated[int | None, typer.Option(help="screen: steps of a screening fine-tune (default: "
                                                          "inner steps / 5)")] = None,
    promote: Annotated[int | None, typer.Option(help="screen: train at most this many screening-front masks for "
                                                     "--inner-steps, spread along the front (default: all)")] = None,
    proxy_fraction: Annotated[float, typer.Option(help="share of the distinct training images (each with all its copies) the inner loop uses")] = 0.5,
    objectives: Annotated[str, typer.Option(help="MEM,QUALITY: denoising|extraction|amd , kid|fid")] = "denoising,kid",
    quality_features: Annotated[str, typer.Option(help="feature space of the quality objective")] = "pixels",
    lr_choices: Annotated[str, typer.Option(help="comma-separated learning rates the search chooses from")] = "3e-4,1e-3,3e-3,1e-2",
    max_trainable_percent: Annotated[float | None, typer.Option(help="constraint: at most this % of the denoiser trains")] = None,
    preference: Annotated[str | None, typer.Option(help="weights MEM,QUALITY for the pick (default: knee point)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per fine-tuning step")] = 32,
    convert_channels: ConvertChannels = False,
    seed: Seed = 0,
    device: Device = "auto",
    out: OutDir = Path("memaudit-search"),
    cache_dir: LatentCacheDir = None,
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    threads: Threads = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="run each generation's evaluations on N Ray workers, one model replica each (a GPU each when "
                          "there are GPUs); 1 runs in this process, without Ray. Same results either way")] = 1,
    ray_address: RayAddress = None,
) -> None:
    """Search masks with NSGA-II; every evaluation is logged, so the same command resumes after a crash (with any
    --workers)."""
    # heavy import (torch, diffusers): see memaudit.cli.app
    from memaudit.mitigate.search import SearchConfig, parse_objectives, run_mask_search

    use_threads(threads)
    memorization, quality = parse_objectives(objectives)
    config = SearchConfig(method=method, granularity=granularity, population=population, generations=generations,
                          inner_steps=inner_steps, schedule=schedule, screen_steps=screen_steps, promote=promote,
                          proxy_fraction=proxy_fraction, memorization=memorization,
                          quality=quality, quality_features=quality_features,
                          lr_choices=parse_floats(lr_choices, "--lr-choices"),
                          max_trainable_percent=max_trainable_percent, batch_size=batch_size, seed=seed, device=device,
                          preference=parse_floats(preference, "--preference") if preference else None,
                          loras=parse_loras(lora, lora_scale), workers=workers, ray_address=ray_address)
    quiet_loading()
    doc = run_with_progress(run_mask_search, kept=lambda: _search_kept(out), base=base, train=train, out=out,
                            config=config, convert_channels=convert_channels, cache_dir=cache_dir)
    _print_search(doc, out, inner_steps)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _reference_label(refs: dict, name: str) -> str:
    """A reference fine-tune of the search in words: full fine-tuning, or its method with every unit."""
    kind = refs[name]["method"]
    return "full fine-tuning" if kind == "full" else f"{kind} with every unit"


def _print_search(doc: dict, out: Path, inner_steps: int) -> None:
    """What a search ran, its front and chosen mask, how the masks fare against the references, and its files."""
    console = make_console()
    if doc.get("latent_cache"):
        cache = doc["latent_cache"]
        console.print(f"latent cache: {cache['encoded']} proxy image(s) encoded now, {cache['found']} found "
                      f"({cache['path']})")
    chosen, ft, refs, verdict = doc["chosen"], doc["fine_tunes"], doc["references"], doc["verdict"]
    masks = _plural(ft["mask_evaluations"], "mask evaluation")
    if "screening" in ft:
        masks += (f" ({_plural(ft['screening'], 'screening fine-tune')} of "
                  f"{_plural(doc['screening']['steps'], 'step')}, {ft['promoted']} promoted to "
                  f"{_plural(inner_steps, 'step')})")
    ref_text = "; ".join(f"{_reference_label(refs, n)} at lr {refs[n]['learning_rate']:g}" for n in ft["references"])
    console.print(f"{_plural(ft['total'], 'fine-tune')} ({ft['run_now']} run now): {masks} + "
                  f"{_plural(len(ft['references']), 'reference')} ({ref_text})")
    if ft["without_training"]:
        console.print(f"{_plural(ft['without_training'], 'mask evaluation')} switched every unit off: scored on the "
                      "base model, without training")
    console.print(f"{_plural(len(doc['front']), 'mask')} on the front")
    if chosen:
        console.print(f"chosen mask {''.join(map(str, chosen['mask']))} at lr {chosen['learning_rate']:g}: "
                      f"{chosen['trainable_percent']:.3f}% of the denoiser, memorization "
                      f"{chosen['objectives']['memorization']:.4f}, quality {chosen['objectives']['quality']:.4f}")
    line = _verdict_line(verdict, refs)
    if line is not None:
        console.print(line)
    if chosen:
        console.print(f"mask: {out / 'mask.json'}")
    console.print(f"front: {out / 'pareto.json'}, {out / 'pareto.png'}")


def _verdict_line(verdict: dict, refs: dict) -> str | None:
    """The search's verdict on its masks against the reference fine-tunes, in a sentence (None: no verdict)."""
    only = "the chosen mask is the best of the masks only."
    status = verdict["status"]
    if status == "reference dominates":
        names = " or ".join(_reference_label(refs, n) for n in verdict["dominating"])
        strict = set(verdict["dominating"]) <= set(verdict["strictly"])
        who = "it is" if len(verdict["dominating"]) == 1 else "each is"
        why = (f"{who} better on both memorization and quality than every mask on the front" if strict
               else "no mask on the front is better on memorization or on quality")
        return f"No mask beats {names}: {why}; {only}"
    if status == "references unbeaten":
        best = verdict["best_reference"]
        return (f"No mask on the front beats the references on either objective: "
                f"{_reference_label(refs, best['memorization'])} has the lowest memorization and "
                f"{_reference_label(refs, best['quality'])} the best quality; {only}")
    if status == "masks competitive":
        n = verdict["front_size"]
        parts = [f"{b['memorization']} of {n} memorize less than {_reference_label(refs, name)} and {b['quality']} "
                 f"of {n} have better quality" for name, b in verdict["masks_better"].items()]
        return f"Masks on the front against the references: {'; '.join(parts)}."
    if status == "no front":
        return "No evaluated mask meets --max-trainable-percent: there is no front and no chosen mask."
    return None


def _search_kept(out: Path) -> str | None:
    from memaudit.mitigate.search import LOG_FILE  # heavy import (torch, diffusers): see memaudit.cli.app

    log = out / LOG_FILE
    if not log.is_file():
        return None
    done = log.read_bytes().count(b"\n")
    return f"Kept {done} finished evaluation(s) in {log}; none is run again."


@mitigate_app.command("finetune")
def mitigate_finetune(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder")],
    mask: Annotated[Path, typer.Option("--mask", help="mask.json written by memaudit mitigate search")],
    train: Annotated[Path, typer.Option("--train", help="training data (any dataset: a mask transfers)")],
    out: Annotated[Path, typer.Option("--out", help="pipeline folder to write (with the adapter in adapter/)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 32,
    mitigation: Annotated[str, typer.Option(help="also a training-time baseline: none, rwa or threshold")] = "none",
    convert_channels: ConvertChannels = False,
    overwrite: Overwrite = False,
    seed: Annotated[int | None, typer.Option(help="seed (default: the search's)")] = None,
    device: Device = "auto",
    cache_dir: LatentCacheDir = None,
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    threads: Threads = None,
) -> None:
    """Fine-tune BASE on the full data with a searched mask (stage 2); resumable like memaudit finetune."""
    from memaudit.mitigate.finetune import finetune_with_mask  # heavy import (torch, diffusers): see memaudit.cli.app

    use_threads(threads)
    quiet_loading()
    with progress_display(lambda: finetune_kept(out)) as bar:
        progress, cache_progress = finetune_callbacks(bar)
        settings = finetune_with_mask(base, train, mask, out, steps=steps, batch_size=batch_size, seed=seed,
                                      mitigation=mitigation, device=device, convert_channels=convert_channels,
                                      overwrite=overwrite, cache_dir=cache_dir, loras=parse_loras(lora, lora_scale),
                                      progress=progress, cache_progress=cache_progress)
    cache = settings.get("latent_cache")
    make_console().print(f"fine-tuned {settings['trainable_parameters']:,} parameters "
                         f"({settings['trainable_percent']:.3f}% of the denoiser); pipeline: {out}"
                         + (f"; latent cache: {cache['encoded']} image(s) encoded now, {cache['found']} found "
                            f"({cache['path']})" if cache else ""))


@mitigate_app.command("export")
def mitigate_export(
    adapter: Annotated[Path, typer.Argument(help="adapter folder (adapter.json + adapter.safetensors)")],
    out: Annotated[Path, typer.Option("--out", help="plain diffusers pipeline folder to write")],
    base: Annotated[str | None, typer.Option(help="base pipeline (default: the one recorded in adapter.json)")] = None,
) -> None:
    """Merge an adapter into its base and write a pipeline folder that plain diffusers loads."""
    # heavy import (torch, diffusers): see memaudit.cli.app
    from memaudit.peft import export_merged, read_adapter_info

    info = read_adapter_info(adapter)
    base = base or info.get("base")
    if not base:
        raise user_error(f"{adapter} records no base model; pass --base.")
    quiet_loading()
    path = export_merged(adapter, base, out)
    make_console().print(f"merged pipeline: {path}")


@mitigate_app.command("units")
def mitigate_units(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder (or a hub id already in the local cache)")],
    method: Annotated[str, typer.Option(help="PEFT method: full, freeze, bias, norm, attention, svdiff, difffit, lora")],
    granularity: Annotated[str, typer.Option(help="block (one unit per transformer block, plus the rest) or layer")] = "block",
    device: Device = "cpu",
) -> None:
    """List the mask units of --method on BASE in mask order: index, name, parameters, % of the denoiser (UNet or transformer)."""
    from rich.table import Table  # rich loads only when a command prints: see memaudit.cli.app

    from memaudit.peft import list_units  # heavy import (torch, diffusers): see memaudit.cli.app

    quiet_loading()
    rows = list_units(base, method, granularity, device=device)
    console = make_console()
    if not rows:
        console.print(f"{method} trains nothing on {base}: it has no units, so there is no mask to pass.")
        return
    table = Table(title=f"{method} units on {base} ({granularity} granularity)")
    table.add_column("#", justify="right")
    table.add_column("unit", overflow="fold")
    table.add_column("parameters", justify="right")
    table.add_column("% of denoiser", justify="right")
    for r in rows:
        table.add_row(str(r.index), r.name, f"{r.parameters:,}", f"{r.percent_of_unet:.4f}")
    console.print(table)
    total = sum(r.parameters for r in rows)
    console.print(f"{len(rows)} units, {total:,} trainable parameters ({sum(r.percent_of_unet for r in rows):.4f}% of "
                  f"the denoiser); a mask (memaudit finetune --mask) is {len(rows)} 0/1 values, one per unit in this order")
