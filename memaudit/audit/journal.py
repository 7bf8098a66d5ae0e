"""The journal of an unfinished audit, in ``OUT.partial/`` (:class:`AuditJournal`): every finished work unit is
kept there, so that the same audit run again after a crash or Ctrl-C samples only what is not; other settings,
model, data or prompts are refused."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from memaudit.core.errors import ConfigError
from memaudit.core.io import atomic_write_bytes, atomic_write_json
from memaudit.core.outputs import partial_dir
from memaudit.core.runs import differences, listed

__all__ = ["IDENTITY_PARTS", "JOURNAL_KIND", "JOURNAL_VERSION", "AuditJournal", "journal_dir", "journal_kept"]

logger = logging.getLogger("memaudit.audit")  # the audit's one logger, as before it was a package


JOURNAL_KIND = "memaudit.audit.journal"
JOURNAL_VERSION = 1


def journal_dir(out: str | Path) -> Path:
    """Where an unfinished audit of ``out`` keeps its journal: ``OUT.partial/`` (as an unfinished fine-tune)."""

    return partial_dir(out)


class AuditJournal:
    """The finished work units of an unfinished audit, in ``OUT.partial/``:

    * ``run.json``: the audit's identity (model and adapters, training and held-out data, prompts, device type and
      every setting that changes a result; not the workers, threads, Ray address or cache folder) and the prompt
      counts;
    * ``units/<kind>-<start>.npz``: one unit's arrays (norms, seeds, AMD distances and nearest training rows, quality
      features and alignment scores when asked for), written atomically before its line;
    * ``grids/prompt-<i>.png``: the grid of a flagged prompt (none for a withheld one), likewise;
    * ``journal.jsonl``: one line per finished unit (its small fields: verdicts, prompts used, ...) or computed value
      (the threshold mitigation's target), appended and fsynced. A line cut short by a crash is dropped, with every
      line after it, and those units are sampled again.
    """

    def __init__(self, folder: Path, identity: dict, counts: dict):
        self.folder, self.identity, self.counts = Path(folder), identity, counts
        self.lines_path = self.folder / "journal.jsonl"
        self.units: dict[tuple[str, int], dict] = {}
        self.values: dict[str, dict] = {}
        self._good_bytes = None
        run_file = self.folder / "run.json"
        if run_file.is_file():
            try:
                earlier = json.loads(run_file.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                earlier = None
            if not isinstance(earlier, dict) or earlier.get("kind") != JOURNAL_KIND:
                raise ConfigError(f"{self.folder} is not the journal of an unfinished audit; move or delete it, or "
                                  "pass another --out.")
            if earlier.get("identity") != identity or earlier.get("version") != JOURNAL_VERSION:
                changed = _differences(earlier.get("identity") or {}, identity)
                raise ConfigError(f"{self.folder} holds an unfinished audit with other {changed}; run the same command "
                                  f"as before to resume it, or delete {self.folder} to start over.")
            self._read()

    @staticmethod
    def check_resume(folder: Path, known: dict) -> None:
        """Refuse (one line) to resume a journal in ``folder`` whose identity differs in what is ``known`` before
        the model loads: the settings and the model folder's content."""
        try:
            earlier = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8")).get("identity") or {}
        except (OSError, ValueError, AttributeError):
            return  # no journal (or not one of ours: the constructor says so)
        if earlier.get("settings") != known["settings"]:
            raise ConfigError(f"{folder} holds an unfinished audit with other {_differences(earlier, known)}; run the "
                              f"same command as before to resume it, or delete {folder} to start over.")
        if known["model_sha256"] is not None and earlier.get("model_sha256") != known["model_sha256"]:
            raise ConfigError(f"{folder} holds an unfinished audit of {earlier.get('model')} as it was before its "
                              f"files changed; delete {folder} to audit the model as it is now.")

    @property
    def exists(self) -> bool:
        return (self.folder / "run.json").is_file()

    def _read(self) -> None:
        if not self.lines_path.is_file():
            self._good_bytes = 0
            return
        data = self.lines_path.read_bytes()
        good = 0
        for line in data.split(b"\n")[:-1]:  # the part after the last newline is a torn line (or nothing)
            try:
                item = json.loads(line)
                if item["type"] == "unit":
                    self._read_unit(item)
                elif item["type"] == "value":
                    self.values.setdefault(item["name"], item["value"])
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("%s: dropping the journal from a damaged line on (%s); those prompts are sampled again",
                               self.lines_path, e)
                break
            good += len(line) + 1
        if good < len(data):
            logger.info("%s: dropping %d bytes of an unfinished line", self.lines_path, len(data) - good)
        self._good_bytes = good

    def _read_unit(self, item: dict) -> None:
        """Take a journaled unit whose files are all there and hold what was written (their SHA-256 in its line);
        one whose files are missing or changed is left out, and its prompts are sampled again."""
        key = (item["kind"], int(item["start"]))
        if key in self.units:
            return
        files = {item["arrays"]: (item.get("sha256") or {}).get(item["arrays"])}
        files.update({self.grid_file(i): (item.get("sha256") or {}).get(self.grid_file(i))
                      for i, g in zip(range(int(item["start"]), int(item["stop"])), item.get("grids") or [])
                      if g is not None and not g.get("withheld")})
        try:
            contents = {rel: (self.folder / rel).read_bytes() for rel in files}
            bad = [rel for rel, digest in files.items()
                   if digest is not None and hashlib.sha256(contents[rel]).hexdigest() != digest]
            if bad:
                raise ValueError(f"{bad[0]} does not hold what was written")
            with np.load(io.BytesIO(contents[item["arrays"]]), allow_pickle=False) as f:
                item["arrays"] = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            logger.warning("%s: %s prompts %d to %d are sampled again (%s)", self.folder, item["kind"],
                           int(item["start"]), int(item["stop"]) - 1, e)
            return
        self.units[key] = item

    def begin(self) -> None:
        """Create the journal (or cut a torn last line off the one found) before the first unit is added."""
        if not self.exists:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / "run.json", {"kind": JOURNAL_KIND, "version": JOURNAL_VERSION,
                                                         "identity": self.identity, **self.counts})
        elif self._good_bytes is not None and self.lines_path.is_file() and \
                self.lines_path.stat().st_size > self._good_bytes:
            os.truncate(self.lines_path, self._good_bytes)

    def has(self, kind: str, start: int) -> bool:
        return (kind, start) in self.units

    def unit(self, kind: str, start: int) -> dict:
        return self.units[(kind, start)]

    def add_unit(self, meta: dict, arrays: dict[str, np.ndarray], grids: dict[int, bytes]) -> dict:
        """Journal a finished unit: its grid PNGs and arrays (atomically), then its line; returns the record as a
        resumed audit reads it back."""
        digests = {}
        for i, png in grids.items():
            atomic_write_bytes(self.folder / self.grid_file(i), png)
            digests[self.grid_file(i)] = hashlib.sha256(png).hexdigest()
        rel = f"units/{meta['kind']}-{meta['start']:06d}.npz"
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.folder / rel, buf.getvalue())
        digests[rel] = hashlib.sha256(buf.getvalue()).hexdigest()
        line = {"type": "unit", **meta, "arrays": rel, "sha256": digests}
        self._append(line)
        record = json.loads(json.dumps(line))
        record["arrays"] = arrays
        self.units[(meta["kind"], meta["start"])] = record
        return record

    def add_value(self, name: str, value: dict) -> None:
        self._append({"type": "value", "name": name, "value": value})
        self.values[name] = json.loads(json.dumps(value))

    @staticmethod
    def grid_file(prompt: int) -> str:
        return f"grids/prompt-{prompt:05d}.png"

    def _append(self, line: dict) -> None:
        with open(self.lines_path, "ab") as f:
            f.write((json.dumps(line) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


#: the parts of an audit's identity, as a refusal names them
IDENTITY_PARTS = {"model_sha256": "the model's files", "heldout": "held-out data",
                  "reference_prompts": "reference prompts", "convert_channels": "--convert-channels"}


def _differences(earlier: dict, now: dict) -> str:
    """What differs between two identities, for the message: settings by name, the rest by what they are."""
    names = differences(earlier, now, parts=IDENTITY_PARTS)
    if not names:
        return "settings (a journal of another memaudit version)"
    return f"settings, model, data or prompts ({listed(names)})"


def journal_kept(out: str | Path) -> str | None:
    """What an interrupted audit of ``out`` has kept, in a sentence (None: nothing); for the Ctrl-C message."""
    folder = journal_dir(out)
    try:
        info = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        lines = (folder / "journal.jsonl").read_bytes().split(b"\n")[:-1] if (folder / "journal.jsonl").is_file() else []
    except (OSError, ValueError):
        return None
    done = {"audit": 0, "reference": 0}
    for line in lines:
        try:
            item = json.loads(line)
        except ValueError:
            break
        if item.get("type") == "unit":
            done[item["kind"]] += int(item["stop"]) - int(item["start"])
    text = f"Kept {done['audit']} of {info.get('prompts')} prompts"
    if info.get("reference_prompts"):
        text += f" and {done['reference']} of {info['reference_prompts']} reference prompts"
    return text + f" in {folder}; none is sampled again."
