"""Work units: the prompts sampled together (:func:`unit_prompts`, :func:`work_units`), and the driver's side of
them (:class:`UnitDriver`): each unit a worker returns is reduced against the training set and journaled."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from memaudit.attacks.extraction import PromptVerdict
from memaudit.audit.config import AuditConfig, Progress, detector_key
from memaudit.audit.journal import AuditJournal
from memaudit.metrics.amd import AMDAccumulator

__all__ = ["MAX_UNIT_PROMPTS", "UnitDriver", "unit_prompts", "work_units"]

logger = logging.getLogger("memaudit.audit")  # the audit's one logger, as before it was a package


#: the most prompts in a work unit that keeps the batches of one pass over every prompt (see :func:`unit_prompts`)
MAX_UNIT_PROMPTS = 16


def unit_prompts(generations: int, batch_size: int) -> int:
    """Prompts per work unit: the fewest whose images fill whole batches (``batch_size / gcd(generations,
    batch_size)``), so that every batch is the one a single pass over all prompts would sample, whatever the unit
    runs on and whenever; when that is more than :data:`MAX_UNIT_PROMPTS`, as many prompts as fit in one batch (at
    least one). Images do not depend on their batch in exact arithmetic, but a batch's floating-point rounding can:
    fixed units make every image the same bit for bit, in one process, on many workers or resumed."""
    k = batch_size // math.gcd(generations, batch_size)
    return k if k <= MAX_UNIT_PROMPTS else max(1, batch_size // generations)


def work_units(n_prompts: int, per_unit: int) -> list[tuple[int, int]]:
    """``[start, stop)`` prompt ranges of the work units, in prompt order."""
    return [(s, min(n_prompts, s + per_unit)) for s in range(0, n_prompts, per_unit)]


def _complete_verdict(partial: dict, medoid_image, lookup, own_index: int | None, delta: float):
    """The extraction verdict of a prompt from the worker's clique part: its medoid checked against the training set
    (the prompt's own image when its caption is a training caption, else the nearest), exactly as
    :func:`~memaudit.attacks.extraction.analyze_prompt` does with the lookup."""
    verdict = PromptVerdict(**partial)
    if medoid_image is not None:
        g = torch.from_numpy(np.array(medoid_image))  # a copy: what comes from Ray is read-only
        if own_index is not None:
            verdict.nearest_train_index = int(own_index)
            verdict.nearest_train_distance = float(lookup.distance(g, int(own_index)))
        else:
            index, distance = lookup.nearest(g)
            verdict.nearest_train_index, verdict.nearest_train_distance = int(index), float(distance)
    verdict.extracted = bool(verdict.flagged and verdict.nearest_train_distance is not None
                             and verdict.nearest_train_distance < delta)
    return verdict


class UnitDriver:
    """The driver's side of the work units: reduces each unit a worker returns against the training set (AMD
    distances, the medoid check, grids withheld under ``redact``), journals it, and reports progress."""

    def __init__(self, journal: AuditJournal, index, lookup, config: AuditConfig, own_of: dict, progress: Progress):
        self.journal, self.index, self.lookup, self.config = journal, index, lookup, config
        self.own_of, self.progress = own_of, progress
        self.resumed: dict[str, int] = {}  # kind -> prompts taken from the journal

    def run(self, executor, kind: str, prompts: list[str], stage: str, edge_threshold: float,
            norm_target: float | None) -> list[dict]:
        """Every unit of ``prompts`` (from the journal, or sampled now), in prompt order."""
        generations = self.config.generations
        units = work_units(len(prompts), unit_prompts(generations, self.config.batch_size))
        total = len(prompts) * generations
        done = [sum((b - a) * generations for a, b in units if self.journal.has(kind, a))]
        todo = [{"kind": kind, "start": a, "prompts": prompts[a:b], "edge_threshold": float(edge_threshold),
                 "norm_target": norm_target} for a, b in units if not self.journal.has(kind, a)]
        self.resumed[kind] = sum(b - a for a, b in units if self.journal.has(kind, a))
        if done[0]:
            logger.info("%s: %d of %d images taken from the journal in %s", stage, done[0], total, self.journal.folder)
        self.progress(stage, done[0], total)

        def on_output(output: dict) -> None:
            self._finish(output, prompts)
            done[0] += (output["stop"] - output["start"]) * generations
            self.progress(stage, done[0], total)

        def on_batch(task: dict, images: int) -> None:  # a unit's last image counts once it is journaled
            if images < len(task["prompts"]) * generations:
                self.progress(stage, done[0] + images, total)

        def describe(task: dict) -> str:
            a, n = task["start"], len(task["prompts"])
            which = "reference prompt" if kind == "reference" else "prompt"
            span = f"{which} {a}" if n == 1 else f"{which}s {a} to {a + n - 1}"
            return f"{span} ({task['prompts'][0]!r}{', ...' if n > 1 else ''})"

        if todo:
            executor.run(todo, on_output, on_batch, describe)
        return [self.journal.unit(kind, a) for a, _ in units]

    def _finish(self, output: dict, prompts: list[str]) -> dict:
        config, kind = self.config, output["kind"]
        batches = output["batches"]
        acc = AMDAccumulator(self.index)
        for b in batches:  # batch by batch, as the features came: faiss's rounding may depend on the query count
            acc.update(b["features"])
        amd = acc.result()
        arrays = {name: np.concatenate([b[name] for b in batches])
                  for name in ("prompt_index", "generation", "seeds", "norms")}
        arrays["distances"], arrays["nearest"] = amd.per_image, amd.nearest
        for name in ("alignment", "q_features"):
            if name in batches[0]:
                arrays[name] = np.concatenate([b[name] for b in batches])
        for name in config.detectors:
            arrays[detector_key(name)] = np.concatenate([b["detectors"][name] for b in batches])
        meta = {"kind": kind, "start": int(output["start"]), "stop": int(output["stop"]),
                "extra_calls": int(output["extra_calls"]), "unet_time_s": float(output["unet_time_s"]),
                "detector_calls": int(output["detector_calls"]),
                "prompts_used": [p for b in batches for p in b["prompts_used"]] if "prompts_used" in batches[0] else None}
        if "mitigation" in output:
            arrays["mitigation_before"] = np.array(output["mitigation"]["before"])
            arrays["mitigation_after"] = np.array(output["mitigation"]["after"])
            meta["mitigation_steps"] = [int(s) for s in output["mitigation"]["steps"]]
        grids = {}
        if kind == "audit":
            verdicts, shown = [], []
            for i in range(output["start"], output["stop"]):
                item = output["prompts"][i]
                verdict = _complete_verdict(item["verdict"], item["medoid_image"], self.lookup,
                                            self.own_of.get(prompts[i]), config.delta)
                verdicts.append(verdict.to_dict())
                if verdict.flagged and config.redact and verdict.extracted:
                    shown.append({"withheld": True})  # matched to a training image: the generations are one
                elif verdict.flagged:
                    grids[i] = item["grid"]
                    shown.append({"columns": int(item["grid_columns"])})
                else:
                    shown.append(None)
            meta["verdicts"], meta["grids"] = verdicts, shown
        elif config.calibrate_edge:
            arrays["small"] = np.stack([output["prompts"][i]["small"] for i in range(output["start"], output["stop"])])
        return self.journal.add_unit(meta, arrays, grids)
