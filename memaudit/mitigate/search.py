"""The outer loop of MemControl: NSGA-II over a binary mask of a PEFT method's units, plus the learning rate.

The search is pymoo's NSGA-II (binary random sampling, two-point crossover, bit-flip mutation, duplicates removed,
every operator driven by ``seed``) run through ask/tell, so that the expensive evaluation (a short fine-tune with the
mask and its audit scores) stays in our own loop and the algorithm is never pickled.

A genome is the mask (one bit per unit) followed by ``ceil(log2(len(lr_choices)))`` bits choosing the learning rate
(``index = value mod len(lr_choices)``). Every evaluation is appended, as one JSON line, to ``evaluations.jsonl``:
the mask, the learning rate, the objectives, the trainable parameter count, the wall time and the seed. The log is
also the cache and the resume point:

- a genome whose mask and learning rate are in the log is never evaluated again;
- rerunning the same search replays NSGA-II from its seed, and every genome it asks for that is in the log is
  answered from there, so the algorithm walks the same path and continues exactly where the previous run stopped
  (only an evaluation in progress at the crash is lost, and it is redone). Killing a search at any moment and
  starting it again gives the same log as a search never interrupted.

The settings and seed are stored in ``search.json`` beside the log; resuming with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memaudit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

LOG_FILE = "evaluations.jsonl"
SETTINGS_FILE = "search.json"

#: evaluate(mask, learning_rate) -> {"objectives": {name: value}, "trainable_parameters": int, ...extra fields}
Evaluate = Callable[[list[int], float], dict]
#: progress(stage, done, total): stage is "generation" or "evaluation"
Progress = Callable[[str, int, int], None]


def lr_bits(n_choices: int) -> int:
    """Bits needed to choose among ``n_choices`` learning rates."""
    if n_choices < 1:
        raise ConfigError("the search needs at least one learning rate choice.")
    return 0 if n_choices == 1 else math.ceil(math.log2(n_choices))


def decode(genome: Sequence[int | bool], n_units: int, lr_choices: Sequence[float]) -> tuple[list[int], float]:
    """The mask and learning rate a genome stands for."""
    bits = [int(b) for b in genome]
    mask, tail = bits[:n_units], bits[n_units:]
    value = int("".join(map(str, tail)), 2) if tail else 0
    return mask, float(lr_choices[value % len(lr_choices)])


def key_of(mask: Sequence[int], lr: float) -> str:
    """The cache key of an evaluation: the mask as a bit string and the learning rate."""
    return "".join(str(int(b)) for b in mask) + f"@{lr:.6g}"


class EvaluationLog:
    """The append-only JSONL log of evaluations, keyed by :func:`key_of`.

    Each line is written with one ``write`` and flushed to disk, so a crash leaves at most one truncated last line,
    which is ignored (and overwritten) on the next open.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.by_key: dict[str, dict] = {}
        if self.path.is_file():
            good = 0
            with open(self.path, "rb") as f:
                data = f.read()
            for line in data.splitlines(keepends=True):
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"search log {self.path} has a corrupt line {len(self.rows) + 1}; "
                                    "delete that line (or the log) to continue.") from e
                self.rows.append(row)
                self.by_key[row["key"]] = row
                good += len(line)
            if good < len(data):
                logger.warning("search log %s: dropping a truncated last line", self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(good)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> dict | None:
        return self.by_key.get(key)

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self.by_key[row["key"]] = row


@dataclass
class SearchResult:
    rows: list[dict]  # every evaluation, in log order
    front: list[dict]  # the non-dominated feasible evaluations
    chosen: dict | None  # the front's pick (knee point or by preference)
    objectives: list[str]
    evaluated: int  # evaluations run in this call (the rest came from the log)
    history: list[dict] = field(default_factory=list)  # per generation: evaluations so far and the front size


def pareto_front(rows: Sequence[dict], objectives: Sequence[str], max_trainable_percent: float | None = None) -> list[dict]:
    """The non-dominated rows (all objectives minimized), among those within the trainable-parameter limit."""
    feasible = [r for r in rows if max_trainable_percent is None or r["trainable_percent"] <= max_trainable_percent]
    if not feasible:
        return []
    f = np.array([[r["objectives"][o] for o in objectives] for r in feasible], dtype=float)
    keep = []
    for i in range(len(f)):
        dominated = np.any(np.all(f <= f[i], axis=1) & np.any(f < f[i], axis=1))
        if not dominated:
            keep.append(i)
    # identical objective vectors: keep the first evaluated
    seen, out = set(), []
    for i in keep:
        k = tuple(f[i])
        if k not in seen:
            seen.add(k)
            out.append(feasible[i])
    return out


def choose(front: Sequence[dict], objectives: Sequence[str], preference: Sequence[float] | None = None) -> dict | None:
    """Pick from the front: objectives are min-max normalized over the front; without a preference, the knee point
    (the point nearest the ideal corner, Euclidean); with weights, the smallest weighted sum."""
    if not front:
        return None
    f = np.array([[r["objectives"][o] for o in objectives] for r in front], dtype=float)
    lo, hi = f.min(0), f.max(0)
    norm = (f - lo) / np.where(hi > lo, hi - lo, 1.0)
    if preference is None:
        score = np.sqrt((norm**2).sum(1))
    else:
        w = np.asarray(preference, dtype=float)
        if w.shape != (len(objectives),) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"--preference needs {len(objectives)} non-negative weights, one per objective.")
        score = norm @ (w / w.sum())
    return front[int(np.argmin(score))]


def nsga2_search(n_units: int, evaluate: Evaluate, log_path: str | os.PathLike, *, objectives: Sequence[str],
                 lr_choices: Sequence[float] = (1e-3,), population: int = 8, generations: int = 4, seed: int = 0,
                 max_trainable_percent: float | None = None, preference: Sequence[float] | None = None,
                 progress: Progress | None = None, on_evaluation: Callable[[dict], None] | None = None) -> SearchResult:
    """Run (or resume) NSGA-II over ``n_units`` mask bits and the learning rate; see the module docstring."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.pntx import TwoPointCrossover
    from pymoo.operators.mutation.bitflip import BitflipMutation
    from pymoo.operators.sampling.rnd import BinaryRandomSampling
    from pymoo.problems.static import StaticProblem

    if n_units < 1:
        raise ConfigError("the method has no units to mask; choose a method with trainable parameters.")
    if population < 2 or generations < 1:
        raise ConfigError("the search needs a population of at least 2 and at least 1 generation.")
    objectives = list(objectives)
    n_var = n_units + lr_bits(len(lr_choices))
    n_constr = 1 if max_trainable_percent is not None else 0
    problem = Problem(n_var=n_var, n_obj=len(objectives), n_ieq_constr=n_constr, xl=0, xu=1, vtype=bool)
    algorithm = NSGA2(pop_size=population, sampling=BinaryRandomSampling(), crossover=TwoPointCrossover(),
                      mutation=BitflipMutation(), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    log = EvaluationLog(log_path)
    evaluated, history, generation = 0, [], 0
    progress = progress or (lambda *_: None)
    while algorithm.has_next():
        pop = algorithm.ask()
        genomes = pop.get("X")
        progress("generation", generation, generations)
        rows = []
        for k, genome in enumerate(genomes):
            mask, lr = decode(genome, n_units, lr_choices)
            key = key_of(mask, lr)
            row = log.get(key)
            if row is None:
                t0 = time.perf_counter()
                out = evaluate(mask, lr)
                missing = [o for o in objectives if o not in out.get("objectives", {})]
                if missing:
                    raise ConfigError(f"the evaluation returned no value for objective(s) {missing}.")
                row = {**out, "key": key, "mask": mask, "learning_rate": lr, "seed": seed,
                       "generation": generation, "index": len(log),
                       "objectives": {o: float(out["objectives"][o]) for o in out["objectives"]},
                       "wall_time_s": time.perf_counter() - t0}
                row.setdefault("trainable_percent", 0.0)
                log.append(row)
                evaluated += 1
                if on_evaluation is not None:
                    on_evaluation(row)
            rows.append(row)
            progress("evaluation", k + 1, len(genomes))
        f = np.array([[r["objectives"][o] for o in objectives] for r in rows], dtype=float)
        kwargs = {"F": f}
        if n_constr:
            kwargs["G"] = np.array([[r["trainable_percent"] - max_trainable_percent] for r in rows], dtype=float)
        Evaluator().eval(StaticProblem(problem, **kwargs), pop)
        algorithm.tell(infills=pop)
        generation += 1
        history.append({"generation": generation, "evaluations": len(log),
                        "front_size": len(pareto_front(log.rows, objectives, max_trainable_percent))})
        progress("generation", generation, generations)
    front = pareto_front(log.rows, objectives, max_trainable_percent)
    return SearchResult(rows=list(log.rows), front=front, chosen=choose(front, objectives, preference),
                        objectives=objectives, evaluated=evaluated, history=history)
