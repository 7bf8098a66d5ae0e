"""The ``memaudit`` command line. Thin: each command parses options, calls the library, and prints.

Heavy modules (torch, diffusers) are imported inside commands so that ``--help`` and ``--version`` are instant.
User mistakes (:class:`memaudit.core.errors.MemauditError`) print one line and exit with code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from memaudit import __version__

app = typer.Typer(
    name="memaudit",
    help="Audit fine-tuned diffusion models for memorized training images, and mitigate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help, not rich's tables: rich squeezes long option names to fit 80 columns and cuts them
    rich_markup_mode=None,
)

Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda")]
OutDir = Annotated[Path, typer.Option("--out", help="folder for results (created; files written atomically)")]
Lora = Annotated[list[Path], typer.Option(
    "--lora", help="LoRA adapter applied to the model (a .safetensors file or its folder, as diffusers' "
                   "load_lora_weights reads it); repeatable")]
LoraScale = Annotated[list[float], typer.Option(
    "--lora-scale", help="weight of each --lora (one value for all, or one per --lora; default 1.0)")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", help="Ray cluster for the workers (HOST:PORT, as `ray start --head` prints it); default: a "
                          "local Ray instance")]
Redact = Annotated[bool, typer.Option("--redact", help="leave every training-image pixel out of the outputs")]
Seed = Annotated[int, typer.Option("--seed", help="seed of every random draw")]
Threads = Annotated[int | None, typer.Option(
    "--threads", envvar="MEMAUDIT_THREADS", show_default="the cores this process may use",
    help="CPU threads for torch; give each of several jobs on one machine its share of the cores")]


def _use_threads(threads: int | None) -> int:
    """Set torch's CPU threads: ``threads``, or every core this process may run on (its CPU affinity mask, which
    ``taskset`` and container CPU limits set; torch's own default counts the machine's cores instead)."""
    import os

    n = threads if threads is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1)
    if n < 1:
        raise _user_error(f"--threads {n} must be at least 1.")
    import torch

    torch.set_num_threads(n)
    return n


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _quiet_loading() -> None:
    """Hide diffusers' and transformers' per-component loading bars: the CLI shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="diffusers pipeline folder (or a hub id already in the local cache)")],
    device: Device = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
) -> None:
    """Load a checkpoint of any supported family (with LoRA adapters) and print what memaudit sees in it."""
    from rich.table import Table

    from memaudit.models import count_parameters
    from memaudit.target import load_target

    _quiet_loading()
    target = load_target(model, device=device, dtype=dtype, loras=_loras(lora, lora_scale))
    table = Table(title=f"{model}", show_header=False)
    rows = [
        ("family", f"{target.family.title} ({type(target.pipe).__name__})"),
        ("prediction type", target.prediction_type),
        ("scheduler", type(target.scheduler).__name__),
        ("resolution", f"{target.resolution} px, {target.image_channels} channel(s)"),
        ("latents", "x".join(map(str, target.latent_shape))),
        ("denoiser parameters", f"{count_parameters(target.denoiser):,} ({type(target.denoiser).__name__})"),
        ("text encoder parameters", ", ".join(f"{count_parameters(m):,}" for m in target.text_encoders)),
        ("VAE parameters", f"{count_parameters(target.vae):,}"),
        ("tokenizer", f"{len(target.tokenizer):,} tokens, {target.tokenizer.model_max_length} max"),
        ("device / dtype", f"{target.device} / {str(target.dtype).replace('torch.', '')}"),
        *[("LoRA", f"{a['path']} (scale {a['scale']:g}, sha256 {a['sha256'][:12]})") for a in target.loras],
    ]
    for k, v in rows:
        table.add_row(k, v)
    _console().print(table)


def _loras(paths: list[Path], scales: list[float]) -> list[list]:
    """``--lora``/``--lora-scale`` pairs: one scale for every adapter, or one per adapter."""
    if scales and not paths:
        raise _user_error("--lora-scale was given without --lora.")
    if len(scales) > 1 and len(scales) != len(paths):
        raise _user_error(f"{len(scales)} --lora-scale values for {len(paths)} --lora adapters; give one value for "
                          "all or one per adapter.")
    bad = [s for s in scales if not math.isfinite(s)]
    if bad:
        raise _user_error(f"--lora-scale {bad[0]} is not a finite number; pass one such as 1 or 0.5.")
    scales = scales * len(paths) if len(scales) == 1 else (scales or [1.0] * len(paths))
    return [[str(p), float(s)] for p, s in zip(paths, scales)]


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _PlainProgress:
    """Progress as plain lines on stderr, for logs and pipes where a live bar shows nothing: a line after a stage's
    first item, then every ``step`` percent (and at its end) with the time elapsed and an estimate of the time left.
    The same calls as rich's ``Progress`` (``add_task``, ``update``, a context manager)."""

    def __init__(self, step: float = 5.0, stream=None, clock=None):
        import time

        self.step, self.stream, self.clock = step, stream or sys.stderr, clock or time.monotonic
        self.tasks: dict[int, dict] = {}
        # stages run one after another and are often first reported after their first batch: a stage is taken to
        # have started at the last event before it
        self.last_event = self.clock()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "done": 0, "started": self.last_event,
                            "printed": -1.0}
        return task

    def update(self, task: int, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["done"] = completed
        self.last_event = self.clock()
        total, done = t["total"], t["done"]
        if not total or total <= 1 or not done:  # one-step stages (loading) and not-yet-started ones say nothing
            return
        percent = 100.0 * done / total
        if t["printed"] >= 0 and percent < 100 and percent - t["printed"] < self.step:
            return
        if t["printed"] >= 100:
            return
        t["printed"] = percent
        elapsed = self.clock() - t["started"]
        line = f"{t['description']}: {done:g}/{total:g} ({percent:.0f}%), {_clock(elapsed)} elapsed"
        if 0 < done < total:
            line += f", about {_clock(elapsed * (total - done) / done)} left"
        print(line, file=self.stream, flush=True)


def _progress_bar():
    """A live bar on a terminal; plain progress lines on stderr when it is not one (a log file, a pipe, CI)."""
    if not sys.stderr.isatty():
        return _PlainProgress()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description:<20}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=True, console=Console(stderr=True))


@contextlib.contextmanager
def _progress(kept: Callable[[], str | None] | None = None):
    """The progress display of a long command. On Ctrl-C it says what the command kept (``kept()``: a sentence
    about what is on disk, or None for nothing) and the exact command that goes on from there, and exits 130."""
    try:
        with _progress_bar() as bar:
            yield bar
    except KeyboardInterrupt:
        typer.echo(_interrupt_message(sys.argv[1:], kept), err=True)
        raise typer.Exit(130) from None


def _run_with_progress(fn, *, kept: Callable[[], str | None] | None = None, **kwargs):
    """Run an audit-like function with one progress bar (or plain progress lines) per stage."""
    with _progress(kept) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return fn(progress=progress, **kwargs)


def reuse_line(summary: dict) -> str:
    """What the audit took from earlier work, in a line: resumed prompts, cached training features."""
    r = summary["reused"]
    parts = []
    if r.get("prompts_resumed"):
        parts.append(f"resumed {r['prompts_resumed']} of {summary['n_prompts']} prompts from {r['journal']}")
    if r.get("reference_prompts_resumed"):
        parts.append(f"{r['reference_prompts_resumed']} reference prompts from the same journal")
    parts.append(f"training features: {r['training_features']}, thumbnails: {r['training_thumbnails']} "
                 f"({r['training_images']} images)")
    return "; ".join(parts)[:1].upper() + "; ".join(parts)[1:]


def _print_summary(results: dict, out: Path) -> None:
    from rich.table import Table

    from memaudit.report import verdict

    s = results["summary"]
    table = Table(title=f"memaudit audit: {results['model']}", show_header=False)
    det = s.get("detection") or {}
    rows = [
        ("prompts / images", f"{s['n_prompts']} / {s['n_images']} ({s['generations_per_prompt']} per prompt)"),
        (f"flagged prompts (clique >= {s['min_clique']})", str(s["flagged_prompts"])),
        ("extracted prompts", str(s["extracted_prompts"])),
        ("extracted training images", str(s["extracted_training_images"])),
        (f"AMD ({s['feature_extractor']})", f"{s['amd']:.4f}" + (
            f" (reference prompts: {s['reference_amd']:.4f})" if s.get("reference_amd") is not None else "")),
        ("mean denoising strength", f"{s['denoising_mean']:.4f}"),
    ]
    if s.get("denoising_threshold") is not None:
        rows.append((f"denoising threshold @ {s['denoising_threshold_fpr']:.0%} FPR",
                     f"{s['denoising_threshold']:.4f} ({s['denoising_flagged']} prompts above)"))
    if det:
        rows.append(("detection AUC / TPR@1%FPR", f"{det['auc']:.3f} / {det['tpr_at_1pct']:.3f}"))
    q = s.get("quality")
    if q:
        rows.append((f"KID / FID ({q['feature_extractor']}, held-out)",
                     f"{q['kid']:.4f} ± {q['kid_std']:.4f} / {q['fid']:.2f} ({q['recommended'].upper()} recommended)"))
    a = s.get("alignment")
    if a and a.get("mean") is not None:
        rows.append((f"alignment ({a['scorer']})", f"{a['mean']:.3f}"))
    m = s.get("mitigation")
    if m:
        detail = f"k={m['rwa_words']}" if m["kind"] == "rwa" else (
            f"target {m['norm_target']:.3f}, norm {m['first_step_norm_before_mean']:.3f} -> "
            f"{m['first_step_norm_after_mean']:.3f}")
        rows.append(("inference-time mitigation", f"{m['kind']} ({detail})"))
    rows.append(("wall time (sampling)", f"{s['wall_time_s']:.0f} s ({s['sampling_time_s']:.0f} s)"))
    for k, v in rows:
        table.add_row(k, v)
    console = _console()
    console.print(verdict(results)[1], soft_wrap=True)
    console.print(table)
    if s.get("reused"):
        console.print(reuse_line(s), soft_wrap=True)
    console.print(f"results: {out / 'results.json'}")
    console.print(f"report:  {out / 'report.html'}")


def _parse_options(options: list[str]) -> dict:
    parsed = {}
    for item in options:
        if "=" not in item:
            raise _user_error(f"--feature-option {item!r} is not KEY=VALUE.")
        k, v = item.split("=", 1)
        try:
            parsed[k.strip()] = json.loads(v)
        except ValueError:
            parsed[k.strip()] = v
    return parsed


@app.command()
def audit(
    model: Annotated[str, typer.Argument(help="diffusers pipeline folder (or a hub id already in the local cache)")],
    train: Annotated[Path, typer.Option("--train", help="training data: a folder or a captions .csv/.jsonl")],
    prompts: Annotated[Path | None, typer.Option(help="prompts file (.txt, .csv, .jsonl); default: the training captions")] = None,
    reference_prompts: Annotated[Path | None, typer.Option(help="prompts known NOT to be memorized, to calibrate thresholds")] = None,
    heldout: Annotated[Path | None, typer.Option(help="held-out images+captions (not trained on): reference prompts and KID/FID")] = None,
    mitigation: Annotated[str, typer.Option(help="inference-time mitigation: none, rwa or threshold")] = "none",
    rwa_words: Annotated[int, typer.Option(help="rwa: random tokens inserted in every prompt")] = 2,
    mitigation_target: Annotated[str, typer.Option(help="threshold: per-image norm target, or auto (median of the reference prompts)")] = "auto",
    quality_features: Annotated[str | None, typer.Option(help="KID/FID feature space (default: --features)")] = None,
    alignment: Annotated[str | None, typer.Option(help="text-image alignment scorer, e.g. demo")] = None,
    generations: Annotated[int, typer.Option(help="images per prompt")] = 16,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 25,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 7.5,
    batch_size: Annotated[int, typer.Option(help="images per denoiser batch")] = 16,
    features: Annotated[str, typer.Option(help="AMD feature space: pixels, open_clip, torchscript, inception")] = "pixels",
    feature_option: Annotated[list[str], typer.Option(help="feature extractor option KEY=VALUE (repeatable), e.g. weights=PATH")] = [],  # noqa: B006
    edge_threshold: Annotated[float, typer.Option(help="tiled L2 under which two generations are joined")] = 0.10,
    min_clique: Annotated[int, typer.Option(help="flag a prompt when its largest clique has this many members")] = 10,
    delta: Annotated[float, typer.Option(help="extracted when the medoid is this close to a training image")] = 0.15,
    calibrate_edge: Annotated[bool, typer.Option(help="set the edge threshold from the reference prompts")] = False,
    fpr: Annotated[float, typer.Option(help="false-positive rate of the calibrated denoising threshold")] = 0.01,
    convert_channels: Annotated[bool, typer.Option(help="convert training images to the model's channels")] = False,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    seed: Seed = 0,
    device: Device = "auto",
    out: OutDir = Path("memaudit-audit"),
    redact: Redact = False,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
        help="where the training-feature index is cached for later audits; never inside --out")] = None,
    threads: Threads = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="sample on N Ray workers, one model replica each (a GPU each when there are GPUs); 1 runs "
                          "in this process, without Ray. Same results either way")] = 1,
    ray_address: RayAddress = None,
) -> None:
    """Audit MODEL for training images it reproduces: extraction attack, AMD and denoising strength. Finished
    prompts are journaled in OUT.partial/: the same command after a crash or Ctrl-C goes on from there."""
    from memaudit.audit import AuditConfig, journal_kept, run_audit

    _use_threads(threads)

    config = AuditConfig(generations=generations, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed,
                         features=features, feature_options=_parse_options(feature_option),
                         edge_threshold=edge_threshold, min_clique=min_clique, delta=delta,
                         calibrate_edge=calibrate_edge, fpr=fpr, redact=redact, device=device, dtype=dtype,
                         mitigation=mitigation, rwa_words=rwa_words, mitigation_target=mitigation_target,
                         quality_features=quality_features, alignment=alignment, loras=_loras(lora, lora_scale),
                         cache_dir=str(cache_dir) if cache_dir is not None else None, workers=workers,
                         ray_address=ray_address)
    _quiet_loading()
    results = _run_with_progress(run_audit, kept=lambda: journal_kept(out), model=model, train=train, out=out,
                                 prompts=prompts, reference_prompts=reference_prompts, config=config,
                                 convert_channels=convert_channels, heldout=heldout)
    _print_summary(results, out)


@app.command()
def finetune(
    base: Annotated[str, typer.Argument(help="diffusers pipeline folder to fine-tune (or a hub id already in the local cache)")],
    train: Annotated[Path, typer.Option("--train", help="training data: a folder or a captions .csv/.jsonl")],
    out: Annotated[Path, typer.Option("--out", help="pipeline folder to write (OUT.partial/ holds checkpoints until done)")],
    method: Annotated[str, typer.Option(help="which parameters train: full, svdiff, difffit, attention, bias, norm, lora")] = "full",
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
    convert_channels: Annotated[bool, typer.Option(help="convert training images to the model's channels")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a finished fine-tune in --out")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
        help="where training latents are cached for later fine-tunes")] = None,
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    threads: Threads = None,
) -> None:
    """Fine-tune BASE on --train data, optionally with a training-time mitigation; resumes after a crash."""
    from memaudit.finetune import FinetuneConfig
    from memaudit.finetune import finetune as run_finetune

    _use_threads(threads)

    bits = None
    if mask is not None:
        if not mask or set(mask) - {"0", "1"}:
            raise _user_error(f"--mask {mask!r} must be a string of 0s and 1s, one per unit of the method (list them "
                              f"with: memaudit mitigate units {base} --method {method} --granularity {granularity}).")
        bits = [int(c) for c in mask]
    config = FinetuneConfig(method=method, granularity=granularity, mask=bits, mitigation=mitigation, steps=steps,
                            learning_rate=lr, batch_size=batch_size,
                            seed=seed, rwa_words=rwa_words, rwa_probability=rwa_probability, threshold=threshold,
                            checkpoint_every=checkpoint_every, save_dtype=save_dtype, loras=_loras(lora, lora_scale))
    _quiet_loading()
    with _progress(lambda: _finetune_kept(out)) as bar:
        tasks: dict[str, int] = {}  # each stage's bar starts with its first event, so its time estimate is its own

        def progress(step: int, total: int, logs: dict) -> None:
            loss = logs.get("running_loss", logs.get("loss"))
            if "fine-tuning" not in tasks:
                tasks["fine-tuning"] = bar.add_task("fine-tuning", total=total)
            bar.update(tasks["fine-tuning"], completed=step, total=total,
                       description=f"fine-tuning (loss {loss:.4f})" if loss == loss and loss is not None else "fine-tuning")

        def cache_progress(done: int, total: int) -> None:
            if "latent cache" not in tasks:
                tasks["latent cache"] = bar.add_task("latent cache", total=total)
            bar.update(tasks["latent cache"], completed=done, total=total)

        settings = run_finetune(base, train, out, config, device=device, convert_channels=convert_channels,
                                overwrite=overwrite, progress=progress, cache_dir=cache_dir,
                                cache_progress=cache_progress)
    r = settings["result"]
    console = _console()
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


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json of an audit (or its folder)")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: report.html beside it); with "
                                             "--redact, a NEW folder for the redacted copy (default: AUDIT-redacted)")] = None,
    redact: Annotated[bool, typer.Option("--redact", help="write a redacted copy (results, report, generations of "
                                         "unextracted prompts) to a new folder; the audit folder is left as it is")] = False,
) -> None:
    """Rebuild the HTML report of an audit from its results.json alone, or make a redacted copy to share."""
    from memaudit.report import write_report

    path = write_report(results, out, redact=redact)
    _console().print(f"report: {path}")


@app.command()
def demo(
    out: OutDir = Path("memaudit-demo"),
    model: Annotated[str, typer.Option(help="bundled model to audit: full_ft or base")] = "full_ft",
    seed: Seed = 0,
    device: Device = "auto",
    redact: Redact = False,
    threads: Threads = None,
) -> None:
    """Audit the bundled model fine-tuned on 80 faces (a few minutes on two CPU cores)."""
    from memaudit.demo.run import run_demo

    _use_threads(threads)

    _quiet_loading()
    results = _run_with_progress(run_demo, out=out, model=model, seed=seed, device=device, redact=redact)
    _print_summary(results, out)


mitigate_app = typer.Typer(help="MemControl: search for the parameters that can be tuned without memorizing.",
                           no_args_is_help=True, rich_markup_mode=None)
app.add_typer(mitigate_app, name="mitigate")


@mitigate_app.command("search")
def mitigate_search(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder to fine-tune")],
    train: Annotated[Path, typer.Option("--train", help="training data: a folder or a captions .csv/.jsonl")],
    method: Annotated[str, typer.Option(help="PEFT method whose units the mask switches: svdiff, difffit, attention, ...")] = "svdiff",
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
    proxy_fraction: Annotated[float, typer.Option(help="share of the training images the inner loop uses")] = 0.5,
    objectives: Annotated[str, typer.Option(help="MEM,QUALITY: denoising|extraction|amd , kid|fid")] = "denoising,kid",
    quality_features: Annotated[str, typer.Option(help="feature space of the quality objective")] = "pixels",
    lr_choices: Annotated[str, typer.Option(help="comma-separated learning rates the search chooses from")] = "3e-4,1e-3,3e-3,1e-2",
    max_trainable_percent: Annotated[float | None, typer.Option(help="constraint: at most this % of the denoiser trains")] = None,
    preference: Annotated[str | None, typer.Option(help="weights MEM,QUALITY for the pick (default: knee point)")] = None,
    batch_size: Annotated[int, typer.Option(help="images per fine-tuning step")] = 32,
    convert_channels: Annotated[bool, typer.Option(help="convert training images to the model's channels")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    out: OutDir = Path("memaudit-search"),
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
        help="where training latents are cached for later fine-tunes")] = None,
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
    from memaudit.mitigate.search import SearchConfig, parse_objectives, run_mask_search

    _use_threads(threads)
    memorization, quality = parse_objectives(objectives)
    config = SearchConfig(method=method, granularity=granularity, population=population, generations=generations,
                          inner_steps=inner_steps, schedule=schedule, screen_steps=screen_steps, promote=promote,
                          proxy_fraction=proxy_fraction, memorization=memorization,
                          quality=quality, quality_features=quality_features, lr_choices=_floats(lr_choices, "--lr-choices"),
                          max_trainable_percent=max_trainable_percent, batch_size=batch_size, seed=seed, device=device,
                          preference=_floats(preference, "--preference") if preference else None,
                          loras=_loras(lora, lora_scale), workers=workers, ray_address=ray_address)
    _quiet_loading()
    doc = _run_with_progress(run_mask_search, kept=lambda: _search_kept(out), base=base, train=train, out=out,
                             config=config, convert_channels=convert_channels, cache_dir=cache_dir)
    console = _console()
    if doc.get("latent_cache"):
        cache = doc["latent_cache"]
        console.print(f"latent cache: {cache['encoded']} proxy image(s) encoded now, {cache['found']} found "
                      f"({cache['path']})")
    chosen, ft, refs, verdict = doc["chosen"], doc["fine_tunes"], doc["references"], doc["verdict"]

    def label(name: str) -> str:
        kind = refs[name]["method"]
        return "full fine-tuning" if kind == "full" else f"{kind} with every unit"

    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    masks = plural(ft["mask_evaluations"], "mask evaluation")
    if "screening" in ft:
        masks += (f" ({plural(ft['screening'], 'screening fine-tune')} of {plural(doc['screening']['steps'], 'step')}, "
                  f"{ft['promoted']} promoted to {plural(inner_steps, 'step')})")
    ref_text = "; ".join(f"{label(n)} at lr {refs[n]['learning_rate']:g}" for n in ft["references"])
    console.print(f"{plural(ft['total'], 'fine-tune')} ({ft['run_now']} run now): {masks} + "
                  f"{plural(len(ft['references']), 'reference')} ({ref_text})")
    if ft["without_training"]:
        console.print(f"{plural(ft['without_training'], 'mask evaluation')} switched every unit off: scored on the "
                      "base model, without training")
    console.print(f"{plural(len(doc['front']), 'mask')} on the front")
    if chosen:
        console.print(f"chosen mask {''.join(map(str, chosen['mask']))} at lr {chosen['learning_rate']:g}: "
                      f"{chosen['trainable_percent']:.3f}% of the denoiser, memorization "
                      f"{chosen['objectives']['memorization']:.4f}, quality {chosen['objectives']['quality']:.4f}")
    only = "the chosen mask is the best of the masks only."
    status = verdict["status"]
    if status == "reference dominates":
        names = " or ".join(label(n) for n in verdict["dominating"])
        strict = set(verdict["dominating"]) <= set(verdict["strictly"])
        who = "it is" if len(verdict["dominating"]) == 1 else "each is"
        why = (f"{who} better on both memorization and quality than every mask on the front" if strict
               else "no mask on the front is better on memorization or on quality")
        console.print(f"No mask beats {names}: {why}; {only}")
    elif status == "references unbeaten":
        best = verdict["best_reference"]
        console.print(f"No mask on the front beats the references on either objective: {label(best['memorization'])} "
                      f"has the lowest memorization and {label(best['quality'])} the best quality; {only}")
    elif status == "masks competitive":
        n = verdict["front_size"]
        parts = [f"{b['memorization']} of {n} memorize less than {label(name)} and {b['quality']} of {n} have "
                 "better quality" for name, b in verdict["masks_better"].items()]
        console.print(f"Masks on the front against the references: {'; '.join(parts)}.")
    elif status == "no front":
        console.print("No evaluated mask meets --max-trainable-percent: there is no front and no chosen mask.")
    if chosen:
        console.print(f"mask: {out / 'mask.json'}")
    console.print(f"front: {out / 'pareto.json'}, {out / 'pareto.png'}")


@mitigate_app.command("finetune")
def mitigate_finetune(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder")],
    mask: Annotated[Path, typer.Option("--mask", help="mask.json written by memaudit mitigate search")],
    train: Annotated[Path, typer.Option("--train", help="training data (any dataset: a mask transfers)")],
    out: Annotated[Path, typer.Option("--out", help="pipeline folder to write (with the adapter in adapter/)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 32,
    mitigation: Annotated[str, typer.Option(help="also a training-time baseline: none, rwa or threshold")] = "none",
    convert_channels: Annotated[bool, typer.Option(help="convert training images to the model's channels")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a finished fine-tune in --out")] = False,
    seed: Annotated[int | None, typer.Option(help="seed (default: the search's)")] = None,
    device: Device = "auto",
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", envvar="MEMAUDIT_CACHE_DIR", show_default="~/.cache/memaudit",
        help="where training latents are cached for later fine-tunes")] = None,
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    threads: Threads = None,
) -> None:
    """Fine-tune BASE on the full data with a searched mask (stage 2); resumable like memaudit finetune."""
    from memaudit.mitigate.finetune import finetune_with_mask

    _use_threads(threads)
    _quiet_loading()
    with _progress(lambda: _finetune_kept(out)) as bar:
        tasks: dict[str, int] = {}  # each stage's bar starts with its first event, so its time estimate is its own

        def stage(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done, total=total)

        settings = finetune_with_mask(base, train, mask, out, steps=steps, batch_size=batch_size, seed=seed,
                                      mitigation=mitigation, device=device, convert_channels=convert_channels,
                                      overwrite=overwrite, cache_dir=cache_dir, loras=_loras(lora, lora_scale),
                                      progress=lambda s, t, _logs: stage("fine-tuning", s, t),
                                      cache_progress=lambda d, t: stage("latent cache", d, t))
    cache = settings.get("latent_cache")
    _console().print(f"fine-tuned {settings['trainable_parameters']:,} parameters "
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
    from memaudit.mitigate.adapter import export_merged, read_adapter_info

    info = read_adapter_info(adapter)
    base = base or info.get("base")
    if not base:
        raise _user_error(f"{adapter} records no base model; pass --base.")
    _quiet_loading()
    path = export_merged(adapter, base, out)
    _console().print(f"merged pipeline: {path}")


@mitigate_app.command("units")
def mitigate_units(
    base: Annotated[str, typer.Argument(help="base diffusers pipeline folder (or a hub id already in the local cache)")],
    method: Annotated[str, typer.Option(help="PEFT method: svdiff, difffit, attention, bias, norm, lora, full")],
    granularity: Annotated[str, typer.Option(help="block (one unit per transformer block, plus the rest) or layer")] = "block",
    device: Device = "cpu",
) -> None:
    """List the mask units of --method on BASE in mask order: index, name, parameters, % of the denoiser (UNet or transformer)."""
    from rich.table import Table

    from memaudit.mitigate.methods import list_units

    _quiet_loading()
    rows = list_units(base, method, granularity, device=device)
    console = _console()
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


def _finetune_kept(out: Path) -> str | None:
    from memaudit.core.outputs import partial_dir
    from memaudit.train import latest_checkpoint

    work = partial_dir(out)
    if not work.is_dir():
        return None
    checkpoint = latest_checkpoint(work / "checkpoints")
    if checkpoint is None:
        return f"No checkpoint was written yet ({work} keeps the settings; one is written every --checkpoint-every steps)."
    return f"Kept the checkpoint {checkpoint} (step {checkpoint.name.split('-')[-1].lstrip('0') or '0'})."


def _search_kept(out: Path) -> str | None:
    from memaudit.mitigate.search import LOG_FILE

    log = out / LOG_FILE
    if not log.is_file():
        return None
    done = log.read_bytes().count(b"\n")
    return f"Kept {done} finished evaluation(s) in {log}; none is run again."


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise _user_error(f"{option} {text!r} must be comma-separated numbers.") from None


def _user_error(message: str):
    from memaudit.core.errors import ConfigError

    return ConfigError(message)


def main() -> None:
    """Console entry point: typer reports usage errors itself (exit 2); memaudit's user errors print one line and
    exit with code 2, never a traceback."""
    from memaudit.core.errors import MemauditError

    try:
        app()
    except MemauditError as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside a command's own handling (see _progress)
        typer.echo(_interrupt_message(sys.argv[1:], None), err=True)
        sys.exit(130)


def _interrupt_message(args: list[str], kept: Callable[[], str | None] | None) -> str:
    """One line after Ctrl-C: what was kept, and the exact command that goes on from it."""
    import shlex

    command = shlex.join(["memaudit", *args])
    try:
        said = kept() if kept is not None else None
    except OSError:  # the partial files are being written as we look: say nothing rather than fail
        said = None
    if said:
        return f"Interrupted. {said} Resume with the same command: {command}"
    return f"Interrupted; nothing was written. Run it again from the start: {command}"


if __name__ == "__main__":
    main()
