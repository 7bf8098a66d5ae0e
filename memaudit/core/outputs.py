"""What memaudit may write, and where: output folders never replace what memaudit did not write.

Every command that writes a folder (``audit``, ``demo``, ``finetune``, ``mitigate search``, ``mitigate finetune``,
``mitigate export``, ``report --redact``) writes it whole at the end (:func:`memaudit.core.io.atomic_directory`), so a
folder already at ``--out`` is replaced. memaudit therefore writes only to an ``--out`` that is

* new, or an empty folder; or
* a folder memaudit itself wrote for the same command: it holds :data:`MARKER`, which names the command and lists
  every file written there, and nothing else has been added since (a folder of an earlier memaudit is recognized by
  its record file: ``results.json``, ``memaudit_finetune.json``, ...).

Anything else is refused in one line before work starts, ``--overwrite`` or not. An output is also refused when it
is, contains or lies inside an input (the model, a LoRA, the training or held-out images, a prompts file, the cache
folder, the results a report reads), or when it is the current folder or holds it (``--out .``): replacing it would
pull the folder from under the shell. The same holds for ``OUT.partial/``, where unfinished runs keep their journal or
checkpoints: memaudit deletes it when the run finishes, so it must be new or memaudit's own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from memaudit import __version__
from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_directory, atomic_write_json, check_writable

MARKER = ".memaudit-output.json"
MARKER_KIND = "memaudit.output"

#: Record files by which the folders of memaudit versions before the marker are recognized: command -> (file, the
#: values it holds)
LEGACY_RECORDS: dict[str, tuple[str, dict]] = {
    "audit": ("results.json", {"kind": "memaudit.audit"}),
    "report --redact": ("results.json", {"kind": "memaudit.audit", "redacted": True}),
    "finetune": ("memaudit_finetune.json", {"kind": "memaudit.finetune"}),
    "search": ("search.json", {"kind": "memaudit.search"}),
    "export": ("memaudit_adapter.json", {}),
}

Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


def real(path: str | os.PathLike) -> Path:
    """``path`` absolute, with every link in its existing part resolved (the folder the bytes go to)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(path)))))


def _names(paths: Sequence[str], most: int = 3) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def existing_inputs(pairs: Inputs) -> list[tuple[str, Path]]:
    """The inputs among ``pairs`` that are paths on this machine (hub ids, in-memory data and None are skipped)."""
    found = []
    for name, p in pairs:
        if p is None or not isinstance(p, (str, os.PathLike)):
            continue
        with contextlib.suppress(OSError, ValueError):
            if Path(p).expanduser().exists():
                found.append((name, real(p)))
    return found


def dataset_inputs(dataset, name: str) -> list[tuple[str, Path]]:
    """The folders holding an on-disk dataset's image files, as inputs named ``name`` (none for in-memory data)."""
    files = getattr(dataset, "files", None) or []
    return [(name, p) for p in sorted({real(f).parent for f in files})]


def check_clear(out: str | os.PathLike, inputs: Inputs, what: str = "--out") -> None:
    """Refuse (one line) an output that is, contains or lies inside one of ``inputs``."""
    target = real(out)
    for name, p in existing_inputs(inputs):
        if p == target:
            relation = "is"
        elif p.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(p):
            relation = "lies inside"
        else:
            continue
        raise ConfigError(f"{what} {out} {relation} {name} {p}; memaudit never writes over or into its inputs: pass "
                          "a new folder outside every input.")


def check_cache(cache: str | os.PathLike, inputs: Inputs) -> None:
    """Refuse (one line) a cache folder that is, contains or lies inside an input other than itself: memaudit
    writes and deletes files there."""
    check_clear(cache, [(name, p) for name, p in inputs if name != "--cache-dir"], "--cache-dir")


def read_marker(folder: Path) -> dict | None:
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == MARKER_KIND else None


def _legacy(folder: Path, command: str) -> bool:
    record = LEGACY_RECORDS.get(command)
    if record is None:
        return False
    try:
        doc = json.loads((folder / record[0]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and all(doc.get(k) == v for k, v in record[1].items())


def folder_files(folder: Path) -> list[str]:
    """Every file below ``folder`` (links included, not followed), as sorted posix paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append(Path(os.path.relpath(os.path.join(root, name), folder)).as_posix())
    return sorted(found)


def check_output(out: str | os.PathLike, command: str, inputs: Inputs = (), *, what: str = "--out",
                 partial: str | os.PathLike | None = None, replaces: bool = True) -> Path:
    """Check, before any work, that ``memaudit COMMAND`` may write the folder ``out``; returns it as a Path.

    ``replaces``: the command replaces the folder whole at the end (every command but the search, which adds its own
    files to the folder as it goes), so a folder of memaudit's that has files memaudit did not list is refused too.
    ``partial``: the folder where an unfinished run keeps its work (``OUT.partial``), checked the same way.
    """
    out = check_writable(out, what)
    target = real(out)
    here = real(Path.cwd())
    if target == here or here.is_relative_to(target):
        raise ConfigError(f"{what} {out} is the current folder or holds it; memaudit writes its output as a new "
                          "folder: pass a new folder name, e.g. --out memaudit-" + command.split()[-1] + ".")
    inputs = list(inputs)
    check_clear(out, inputs, what)
    if partial is not None:
        check_clear(partial, inputs, f"{what}'s work folder")
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        if marker is None and not _legacy(target, command):
            raise ConfigError(f"{what} {out} exists and holds files memaudit did not write for `memaudit {command}` "
                              f"({_names(folder_files(target))}); memaudit never replaces them: pass a new or empty "
                              "folder.")
        if marker is not None and marker.get("command") != command:
            raise ConfigError(f"{what} {out} holds the output of `memaudit {marker.get('command')}`, not of `memaudit "
                              f"{command}`; pass a new or empty folder.")
        if replaces and marker is not None and isinstance(marker.get("files"), list):
            extra = [f for f in folder_files(target) if f != MARKER and f not in set(marker["files"])]
            if extra:
                raise ConfigError(f"{what} {out} holds files memaudit did not write ({_names(extra)}); memaudit "
                                  "never deletes them: move them out, or pass a new folder.")
    return out


def check_partial(folder: str | os.PathLike, record: str, what: str) -> None:
    """Refuse a work folder (``OUT.partial``) that exists, is not empty and has no ``record`` file of memaudit's:
    memaudit removes its work folder when the run finishes, so it must not be someone else's."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}, where {what} keeps its unfinished work, is a file; move it, or pass another "
                          "--out.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / record).is_file():
        raise ConfigError(f"{folder} exists and is not an unfinished memaudit run ({_names(folder_files(folder))}); "
                          f"memaudit would delete it when {what} finishes: move it, or pass another --out.")


def write_marker(folder: str | os.PathLike, command: str, *, listed: bool = True) -> Path:
    """Mark ``folder`` as memaudit's output of ``command``; with ``listed``, name every file in it (written last)."""
    folder = Path(folder)
    doc = {"kind": MARKER_KIND, "command": command, "memaudit": __version__,
           "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "files": [f for f in folder_files(folder) if f != MARKER] if listed else None}
    return atomic_write_json(folder / MARKER, doc)


@contextlib.contextmanager
def output_directory(out: str | os.PathLike, command: str) -> Iterator[Path]:
    """:func:`memaudit.core.io.atomic_directory` for a command's output: the folder is marked as memaudit's, listing
    every file written, before it replaces ``out``. Call :func:`check_output` before any work."""
    with atomic_directory(out) as tmp:
        yield tmp
        write_marker(tmp, command)


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished run keeps its settings and checkpoints."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # "." or "..": the folder it names
        out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".partial")
