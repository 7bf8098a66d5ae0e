"""The commands that look at a model or an audit: ``info``, ``audit``, ``report`` and ``demo``.

Registered on the app by :mod:`memaudit.cli.app`, in the order ``--help`` lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memaudit.cli.options import (
    ConvertChannels,
    Detectors,
    Device,
    Dtype,
    FeatureCacheDir,
    Lora,
    LoraScale,
    OutDir,
    RayAddress,
    Redact,
    Seed,
    Threads,
    Train,
    parse_loras,
    parse_options,
    use_threads,
)
from memaudit.cli.progress import make_console, print_summary, quiet_loading, run_with_progress

__all__ = ["audit", "demo", "detectors", "info", "report"]


def info(
    model: Annotated[str, typer.Argument(help="diffusers pipeline folder (or a hub id already in the local cache)")],
    device: Device = "cpu",
    dtype: Dtype = "float32",
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
) -> None:
    """Load a checkpoint of any supported family (with LoRA adapters) and print what memaudit sees in it."""
    from rich.table import Table  # rich loads only when a command prints: see memaudit.cli.app

    # heavy import (torch, diffusers): see memaudit.cli.app
    from memaudit.models import count_parameters
    from memaudit.target import load_target

    quiet_loading()
    target = load_target(model, device=device, dtype=dtype, loras=parse_loras(lora, lora_scale))
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
    make_console().print(table)


def audit(
    model: Annotated[str, typer.Argument(help="diffusers pipeline folder (or a hub id already in the local cache)")],
    train: Train,
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
    fpr: Annotated[float, typer.Option(help="false-positive rate of the calibrated thresholds")] = 0.01,
    detectors: Detectors = "default",
    convert_channels: ConvertChannels = False,
    dtype: Dtype = "float32",
    lora: Lora = [],  # noqa: B006
    lora_scale: LoraScale = [],  # noqa: B006
    seed: Seed = 0,
    device: Device = "auto",
    out: OutDir = Path("memaudit-audit"),
    redact: Redact = False,
    cache_dir: FeatureCacheDir = None,
    threads: Threads = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="sample on N Ray workers, one model replica each (a GPU each when there are GPUs); 1 runs "
                          "in this process, without Ray. Same results either way")] = 1,
    ray_address: RayAddress = None,
) -> None:
    """Audit MODEL for training images it reproduces: extraction attack, AMD and denoising strength. Finished
    prompts are journaled in OUT.partial/: the same command after a crash or Ctrl-C goes on from there."""
    # heavy import (torch, diffusers): see memaudit.cli.app
    from memaudit.audit import AuditConfig, journal_kept, run_audit

    use_threads(threads)

    config = AuditConfig(generations=generations, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed,
                         features=features, feature_options=parse_options(feature_option),
                         edge_threshold=edge_threshold, min_clique=min_clique, delta=delta,
                         calibrate_edge=calibrate_edge, fpr=fpr, redact=redact, device=device, dtype=dtype,
                         mitigation=mitigation, rwa_words=rwa_words, mitigation_target=mitigation_target,
                         quality_features=quality_features, alignment=alignment, loras=parse_loras(lora, lora_scale),
                         cache_dir=str(cache_dir) if cache_dir is not None else None, workers=workers,
                         ray_address=ray_address, detectors=detectors)
    quiet_loading()
    results = run_with_progress(run_audit, kept=lambda: journal_kept(out), model=model, train=train, out=out,
                                prompts=prompts, reference_prompts=reference_prompts, config=config,
                                convert_channels=convert_channels, heldout=heldout)
    print_summary(results, out)


def report(
    results: Annotated[Path, typer.Argument(help="results.json of an audit (or its folder)")],
    out: Annotated[Path | None, typer.Option("--out", help="HTML file to write (default: report.html beside it); with "
                                             "--redact, a NEW folder for the redacted copy (default: AUDIT-redacted)")] = None,
    redact: Annotated[bool, typer.Option("--redact", help="write a redacted copy (results, report, generations of "
                                         "unextracted prompts) to a new folder; the audit folder is left as it is")] = False,
) -> None:
    """Rebuild the HTML report of an audit from its results.json alone, or make a redacted copy to share."""
    from memaudit.report import write_report  # heavy import (~0.3 s): see memaudit.cli.app

    path = write_report(results, out, redact=redact)
    make_console().print(f"report: {path}")


#: the bundled settings, as memaudit.demo.settings.SETTINGS names them (tests/test_settings.py checks it): listed
#: here so that ``memaudit --help`` does not import torch (see memaudit.cli.app)
DEMO_SETTINGS = ("faces", "fashion")


def demo(
    out: OutDir = Path("memaudit-demo"),
    setting: Annotated[str, typer.Option(help="bundled setting: " + ", ".join(DEMO_SETTINGS) + " (what each is: "
                                         "--list-settings)")] = DEMO_SETTINGS[0],
    model: Annotated[str, typer.Option(help="bundled model to audit: full_ft or base")] = "full_ft",
    list_settings: Annotated[bool, typer.Option("--list-settings", help="print the bundled settings, one per line "
                                                "(name, then what it is), and stop")] = False,
    seed: Seed = 0,
    device: Device = "auto",
    redact: Redact = False,
    threads: Threads = None,
    detectors: Detectors = "default",
) -> None:
    """Audit a bundled fine-tuned model (default: the one fine-tuned on 80 faces; a few minutes on two CPU cores)."""
    if list_settings:
        from memaudit.demo.settings import SETTINGS  # heavy import (torch, diffusers): see memaudit.cli.app

        for name, chosen in SETTINGS.items():
            typer.echo(f"{name}\t{chosen.summary}")
        return
    from memaudit.demo.run import run_demo  # heavy import (torch, diffusers): see memaudit.cli.app

    use_threads(threads)

    quiet_loading()
    results = run_with_progress(run_demo, out=out, setting=setting, model=model, seed=seed, device=device,
                                redact=redact, detectors=detectors)
    print_summary(results, out)


def detectors() -> None:
    """List the memorization detectors, one per line: name, extra denoiser evaluations per image beyond sampling
    (free ones run by default), the families it reads, what it measures and its paper."""
    # heavy import (torch): see memaudit.cli.app
    from memaudit.detectors import available, get_detector
    from memaudit.families import FAMILIES

    for name in available():
        cls = get_detector(name)
        cost = "free (default)" if cls.free() else f"+{cls.extra_calls} evaluations per image"
        families = ",".join(cls.families or FAMILIES)
        typer.echo(f"{name}\t{cost}\t{families}\t{cls.summary}\t{cls.source}")
