"""What the commands show while they run and when they end: a live bar on a terminal or plain progress lines in logs,
the message after Ctrl-C (what was kept, and the command that goes on from there), and the audit summary."""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

__all__ = [
    "PlainProgress",
    "interrupt_message",
    "make_console",
    "print_summary",
    "progress_display",
    "quiet_loading",
    "reuse_line",
    "run_with_progress",
]


def quiet_loading() -> None:
    """Hide diffusers' and transformers' per-component loading bars: the CLI shows its own progress."""
    import diffusers  # heavy import (diffusers, transformers): see memaudit.cli.app
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def make_console():
    """A rich console on stdout, without highlighting."""
    from rich.console import Console  # rich loads only when a command prints: see memaudit.cli.app

    return Console(stderr=False, highlight=False)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class PlainProgress:
    """Progress as plain lines on stderr, for logs and pipes where a live bar shows nothing: a line after a stage's
    first item, then every ``step`` percent (and at its end) with the time elapsed and an estimate of the time left.
    The same calls as rich's ``Progress`` (``add_task``, ``update``, a context manager)."""

    def __init__(self, step: float = 5.0, stream=None, clock=None):
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
        return PlainProgress()
    # rich's live bar loads only on a terminal: see memaudit.cli.app
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


def interrupt_message(args: list[str], kept: Callable[[], str | None] | None) -> str:
    """One line after Ctrl-C: what was kept, and the exact command that goes on from it."""
    command = shlex.join(["memaudit", *args])
    try:
        said = kept() if kept is not None else None
    except OSError:  # the partial files are being written as we look: say nothing rather than fail
        said = None
    if said:
        return f"Interrupted. {said} Resume with the same command: {command}"
    return f"Interrupted; nothing was written. Run it again from the start: {command}"


@contextlib.contextmanager
def progress_display(kept: Callable[[], str | None] | None = None):
    """The progress display of a long command. On Ctrl-C it says what the command kept (``kept()``: a sentence
    about what is on disk, or None for nothing) and the exact command that goes on from there, and exits 130."""
    try:
        with _progress_bar() as bar:
            yield bar
    except KeyboardInterrupt:
        typer.echo(interrupt_message(sys.argv[1:], kept), err=True)
        raise typer.Exit(130) from None


def run_with_progress(fn, *, kept: Callable[[], str | None] | None = None, **kwargs):
    """Run an audit-like function with one progress bar (or plain progress lines) per stage."""
    with progress_display(kept) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return fn(progress=progress, **kwargs)


def finetune_callbacks(bar) -> tuple[Callable[[int, int, dict], None], Callable[[int, int], None]]:
    """A fine-tune's ``progress`` (steps, with the running loss) and ``cache_progress`` (latents encoded) on ``bar``;
    each stage's bar starts with its first event, so its time estimate is its own."""
    tasks: dict[str, int] = {}

    def stage(name: str, done: int, total: int, description: str | None = None) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total)
        bar.update(tasks[name], completed=done, total=total, description=description or name)

    def progress(step: int, total: int, logs: dict) -> None:
        loss = logs.get("running_loss", logs.get("loss"))
        known = loss is not None and loss == loss
        stage("fine-tuning", step, total, f"fine-tuning (loss {loss:.4f})" if known else None)

    return progress, lambda done, total: stage("latent cache", done, total)


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


def print_summary(results: dict, out: Path) -> None:
    """The verdict and a table of an audit's (or the demo's) results, and where its files are."""
    from rich.table import Table  # rich loads only when a command prints: see memaudit.cli.app

    from memaudit.report import verdict  # heavy import (~0.3 s): see memaudit.cli.app

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
    console = make_console()
    console.print(verdict(results)[1], soft_wrap=True)
    console.print(table)
    if s.get("reused"):
        console.print(reuse_line(s), soft_wrap=True)
    console.print(f"results: {out / 'results.json'}")
    console.print(f"report:  {out / 'report.html'}")
