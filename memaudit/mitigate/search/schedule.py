"""The schedules of the search. ``plain``: NSGA-II on evaluations that fine-tune ``inner_steps``. ``screen``: NSGA-II
on short screening evaluations, then the masks of their front promoted to the full ``inner_steps``
(:func:`promote`, in :func:`spread_order`). Either way followed by the references (:func:`run_schedule`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memaudit.mitigate.search.config import OBJECTIVES, SearchConfig
from memaudit.mitigate.search.log import LOG_FILE, EvaluationLog, InOrder
from memaudit.mitigate.search.nsga2 import OnResult, Progress, RunJobs, choose, nsga2_search, pareto_front
from memaudit.mitigate.search.references import reference_evaluations

__all__ = ["PROMOTED_FILE", "promote", "row_inner_steps", "run_schedule", "spread_order"]

PROMOTED_FILE = "promoted.jsonl"


def row_inner_steps(row: dict, inner_steps: int) -> int:
    """Fine-tuning steps a logged evaluation ran: its ``inner_steps``, or, in logs written before evaluations
    recorded it, the search's ``inner_steps`` (0 for an all-zero mask, which trains nothing)."""
    if "inner_steps" in row:
        return int(row["inner_steps"])
    return inner_steps if any(row.get("mask") or []) else 0


def spread_order(front: Sequence[dict], objectives: Sequence[str] = OBJECTIVES) -> list[dict]:
    """The rows of a front ordered so that every prefix spreads along it: the best row of each objective first, then
    repeatedly the row farthest (Euclidean, each objective scaled to [0, 1] over the front) from those already taken.
    Ties go to the earlier row, so the order is deterministic."""
    rows = list(front)
    if len(rows) <= 2:
        return sorted(rows, key=lambda r: [r["objectives"][o] for o in objectives])
    pts = np.array([[r["objectives"][o] for o in objectives] for r in rows], dtype=float)
    lo, hi = pts.min(0), pts.max(0)
    pts = (pts - lo) / np.where(hi > lo, hi - lo, 1.0)
    taken: list[int] = []
    for j in range(pts.shape[1]):
        best = int(np.argmin(pts[:, j]))
        if best not in taken:
            taken.append(best)
    while len(taken) < len(rows):
        dist = np.linalg.norm(pts[:, None, :] - pts[None, taken, :], axis=2).min(1)
        dist[taken] = -1.0
        taken.append(int(np.argmax(dist)))
    return [rows[i] for i in taken]


def promote(run: RunJobs, screening_front: Sequence[dict], out: Path, config: SearchConfig,
            progress: Progress | None) -> tuple[list[dict], int]:
    """The screen schedule's second stage: the masks of the screening front (at most ``config.promote`` of them,
    in :func:`spread_order`) fine-tuned for the full inner steps and scored again (cached and resumable in
    ``promoted.jsonl``, written in that order). Returns those rows and how many ran now."""
    screening_front = spread_order(screening_front)[:config.promote]
    log = EvaluationLog(out / PROMOTED_FILE)
    todo = [k for k, row in enumerate(screening_front) if log.get(row["key"]) is None]

    def emit(k: int, item) -> None:
        row = screening_front[k]
        if item is not None:
            res, seconds = item
            log.append({**res, "key": row["key"], "mask": row["mask"], "learning_rate": row["learning_rate"],
                        "seed": config.seed, "index": len(log), "screen_index": row["index"],
                        "screen_objectives": row["objectives"], "wall_time_s": seconds})
        if progress is not None:
            progress("promotion", k + 1, len(screening_front))

    ordered = InOrder(len(screening_front), emit)
    for k in set(range(len(screening_front))) - set(todo):
        ordered.put(k)
    run([{"mask": screening_front[k]["mask"], "learning_rate": screening_front[k]["learning_rate"]} for k in todo],
        lambda j, res, seconds: ordered.put(todo[j], (res, seconds)))
    keys = {r["key"] for r in screening_front}
    return [r for r in log.rows if r["key"] in keys], len(todo)


def run_schedule(run: RunJobs, out: Path, config: SearchConfig, n_units: int, progress: Progress | None) -> dict:
    """NSGA-II, the screen schedule's promotions and the references, every evaluation through ``run``."""
    screen = config.schedule == "screen"
    steps = config.screen_steps if screen else config.inner_steps

    def evaluate_many(jobs: list[tuple[list[int], float]], on_result: OnResult) -> None:
        run([{"mask": mask, "learning_rate": lr, "steps": steps} for mask, lr in jobs], on_result)

    result = nsga2_search(n_units, None, out / LOG_FILE, objectives=OBJECTIVES, lr_choices=config.lr_choices,
                          population=config.population, generations=config.generations, seed=config.seed,
                          max_trainable_percent=config.max_trainable_percent, preference=config.preference,
                          progress=progress, evaluate_many=evaluate_many)
    rows, front, chosen, evaluated = result.rows, result.front, result.chosen, result.evaluated
    if screen:
        rows, evaluated_full = promote(run, result.front, out, config, progress)
        evaluated += evaluated_full
        front = pareto_front(rows, OBJECTIVES, config.max_trainable_percent)
        chosen = choose(front, OBJECTIVES, config.preference)
    # references: the method's default (every unit, its default learning rate) and full fine-tuning
    references, references_now = reference_evaluations(run, out, config)
    return {"result": result, "rows": rows, "front": front, "chosen": chosen, "evaluated": evaluated,
            "references": references, "references_now": references_now}
