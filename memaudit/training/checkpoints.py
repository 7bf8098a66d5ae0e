"""Checkpoints of the training loop: writing them, finding the newest intact one, resuming from it.

A checkpoint ``step-N/`` is a diffusers pipeline folder written atomically, plus the optimizer, generator and hook
states (``training_state.pt``), so an interrupted run resumes where it stopped and ends at the same weights. Each
checkpoint lists its files and sizes (``manifest.json``); a resume skips a damaged one (a file truncated or missing,
or a training state whose CRCs fail) for the previous intact one with a warning, and when none is intact says in one
line which folder to delete (:func:`checkpoint_problem`). The ``latest`` pointer, moved last, names the newest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_directory, atomic_write_json, atomic_write_text
from memaudit.training.hooks import TrainHook, TrainState

# the logger keeps the name it had before the training package, so users' logs read the same
logger = logging.getLogger("memaudit.train")

__all__ = ["LATEST", "MANIFEST_FILE", "STATE_FILE", "STEP_DIR", "RunClock", "checkpoint_dirs", "checkpoint_problem",
           "clear_checkpoints", "latest_checkpoint", "load_checkpoint", "resume_point", "save_checkpoint"]

STATE_FILE = "training_state.pt"
#: the files of a checkpoint and their sizes, written last inside it (see :func:`checkpoint_problem`)
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"step-\d+")
# the training states' CRC checks, by path and stat (a file that changes is checked again)
_CRC_CHECKED: dict[tuple, str | None] = {}
_WARNED: set[tuple[str, str, str]] = set()


def checkpoint_dirs(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints in ``checkpoint_dir`` (folders ``step-N`` holding a training state), oldest first; see
    :func:`checkpoint_problem` for whether one is intact."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with the checkpoint folder ``path``, in a few words (None: it is intact).

    Two checks: every file the checkpoint was written with (``manifest.json``, written last inside the checkpoint)
    is there with its size (a truncated or deleted file, pipeline weights included), and every record of the training
    state (a zip archive) matches the CRC-32 torch stored for it (a file damaged in place; this reads the state once
    per process, and again only when the file changes). Checkpoints written before the manifest get the second check
    only."""
    import zipfile

    path = Path(path)
    state = path / STATE_FILE
    if not state.is_file():
        return f"it has no {STATE_FILE}"
    manifest = path / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = {str(k): int(v) for k, v in json.loads(manifest.read_text())["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"its {MANIFEST_FILE} is unreadable"
        for rel, size in sizes.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} is {f.stat().st_size:,} bytes where {size:,} were written"
    st = state.stat()
    stamp = (str(state.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if stamp not in _CRC_CHECKED:
        try:
            with zipfile.ZipFile(state) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            _CRC_CHECKED[stamp] = f"{STATE_FILE} is not a complete torch file ({why})"
        else:
            _CRC_CHECKED[stamp] = None if bad is None else f"{STATE_FILE} is damaged ({bad} fails its CRC check)"
    return _CRC_CHECKED[stamp]


def _candidates(root: Path) -> list[Path]:
    """Checkpoints to resume from, best first: the one the ``latest`` pointer names, then the others newest first."""
    found = checkpoint_dirs(root)[::-1]
    pointer = root / LATEST
    if pointer.is_file():
        try:
            named = root / pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def _note_skipped(skipped: list[tuple[Path, str]], chosen: Path | None) -> None:
    for path, why in skipped:
        key = (str(path), why, str(chosen))
        if key not in _WARNED:
            _WARNED.add(key)
            logger.warning("checkpoint %s is damaged (%s): skipped, %s", path, why,
                           f"resuming from {chosen.name}" if chosen is not None else "and no earlier one is intact")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest intact checkpoint: the one the ``latest`` pointer names (written last, atomically), else the newest
    complete one; a damaged one (:func:`checkpoint_problem`) is skipped with a warning naming it and why."""
    root = Path(checkpoint_dir)
    skipped = []
    for candidate in _candidates(root):
        why = checkpoint_problem(candidate)
        if why is None:
            _note_skipped(skipped, candidate)
            return candidate
        skipped.append((candidate, why))
    _note_skipped(skipped, None)
    return None


def clear_checkpoints(checkpoint_dir: str | os.PathLike) -> None:
    """Remove the checkpoints of an earlier run in ``checkpoint_dir`` and its ``latest`` pointer (a run that starts
    over would otherwise mistake them for its own)."""
    for old in checkpoint_dirs(checkpoint_dir):
        logger.warning("resume=False: removing earlier checkpoint %s", old)
        shutil.rmtree(old, ignore_errors=True)
    (Path(checkpoint_dir) / LATEST).unlink(missing_ok=True)


class RunClock:
    """A training run's wall time across resumes: the time recorded in ``path`` by the runs it resumes (written
    beside each checkpoint, so it counts up to the checkpoint resumed from, not the steps a crash lost) plus this
    run's since the clock was made."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.earlier = json.loads(self.path.read_text())["wall_time_s"] if self.path.is_file() else 0.0
        self.started = time.perf_counter()

    def total(self) -> float:
        return self.earlier + time.perf_counter() - self.started

    def progress(self, every: int, then: Callable[[int, int, dict], None] | None = None):
        """A training progress callback that records the total every ``every`` steps and at the last step (when the
        loop checkpoints), then calls ``then``."""

        def on_progress(step: int, total: int, logs: dict) -> None:
            if every and (step % every == 0 or step == total):
                atomic_write_json(self.path, {"wall_time_s": self.total()})
            if then is not None:
                then(step, total, logs)

        return on_progress


def _named_trainables(target, params: Sequence[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for p in params}
    named: dict[str, torch.nn.Parameter] = {}
    # the trained denoiser is saved under the key "unet", whatever its family calls it (the on-disk format)
    modules = [("unet", target.unet)] + [(n, m) for n, m in target.modules() if m is not target.unet]
    for prefix, module in modules:
        for name, p in module.named_parameters():
            if id(p) in ids:
                named.setdefault(f"{prefix}.{name}", p)
    return named


def save_checkpoint(state: TrainState, optimizer, scaler, hooks: Sequence[TrainHook], checkpoint_dir, losses,
                    save_pipeline: Callable[[object, Path], None] | None = None) -> Path:
    """Write ``step-N/`` (pipeline folder + training state) atomically, then move the ``latest`` pointer."""
    root = Path(checkpoint_dir)
    path = root / f"step-{state.step:07d}"
    with atomic_directory(path) as tmp:
        (save_pipeline or _save_pipeline)(state.target, tmp / "pipeline")
        named = _named_trainables(state.target, state.params)
        torch.save(
            {
                "step": state.step,
                "skipped_steps": state.skipped_steps,
                "stats": state.stats,
                "losses": list(losses),
                "params": {k: v.detach().cpu().clone() for k, v in named.items()},
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "generator": state.generator.get_state(),
                "hooks": [h.state_dict() for h in hooks],
                "config": state.config.to_dict(),
            },
            tmp / STATE_FILE,
        )
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")
    atomic_write_text(root / LATEST, path.name)
    for old in checkpoint_dirs(root)[: -state.config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _save_pipeline(target, path: Path) -> None:
    target.pipeline().save_pretrained(path, safe_serialization=True)


#: what a checkpoint's training state must hold
_STATE_KEYS = ("step", "skipped_steps", "stats", "losses", "params", "optimizer", "scaler", "generator", "hooks")


def _read_state(path: Path) -> dict:
    """The training state of checkpoint ``path``; ValueError (with what is wrong) when it cannot be used."""
    import pickle
    import zipfile

    try:
        blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{STATE_FILE} could not be read: {why}") from e
    lacking = [k for k in _STATE_KEYS if not isinstance(blob, dict) or k not in blob]
    if lacking:
        raise ValueError(f"{STATE_FILE} lacks {lacking[0]!r}")
    return blob


def resume_point(checkpoint_dir: str | os.PathLike) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that is intact and readable, with its training state (None, None: there is none).

    Damaged ones are skipped with a warning; when every checkpoint is damaged, a ConfigError says which folder to
    delete to start the run over."""
    root = Path(checkpoint_dir)
    skipped: list[tuple[Path, str]] = []
    for candidate in _candidates(root):
        why = checkpoint_problem(candidate)
        if why is None:
            try:
                blob = _read_state(candidate)
            except ValueError as e:
                why = str(e)
            else:
                _note_skipped(skipped, candidate)
                return candidate, blob
        skipped.append((candidate, why))
    if skipped:
        _note_skipped(skipped, None)
        path, why = skipped[0]
        more = f" (and {len(skipped) - 1} earlier one(s))" if len(skipped) > 1 else ""
        raise ConfigError(f"no checkpoint in {root} can be resumed: {path.name} is damaged ({why}){more}; delete "
                          f"{root} to start the run over.")
    return None, None


def load_checkpoint(path: Path, blob: dict, state: TrainState, optimizer, scaler,
                    hooks: Sequence[TrainHook]) -> list[float]:
    """Restore the run ``state`` (trained weights, optimizer, scaler, generator, counters, hooks) from the training
    state ``blob`` of checkpoint ``path`` (:func:`resume_point`); returns the losses so far."""
    named = _named_trainables(state.target, state.params)
    missing = set(named) - set(blob["params"])
    if missing:
        raise ConfigError(
            f"checkpoint {path} does not match this run (it lacks {sorted(missing)[0]}); "
            "use another output folder or delete the checkpoint to start over."
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(blob["params"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(blob["optimizer"])
    if scaler is not None and blob["scaler"]:
        scaler.load_state_dict(blob["scaler"])
    state.generator.set_state(blob["generator"])
    state.step, state.skipped_steps, state.stats = blob["step"], blob["skipped_steps"], blob["stats"]
    for hook, hs in zip(hooks, blob["hooks"]):
        hook.load_state_dict(hs)
    return list(blob["losses"])
