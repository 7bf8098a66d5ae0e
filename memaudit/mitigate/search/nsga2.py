"""NSGA-II over the genomes of the mask search (pymoo, through ask/tell, one generation at a time), the checks of its
size, and the Pareto front and pick of its evaluations; see :mod:`memaudit.mitigate.search`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from memaudit.core.errors import ConfigError
from memaudit.mitigate.search.genome import decode, key_of, lr_bits
from memaudit.mitigate.search.log import EvaluationLog, InOrder

__all__ = ["MAX_GENERATIONS", "MAX_POPULATION", "Evaluate", "EvaluateMany", "OnResult", "Progress", "RunJobs",
           "SearchResult", "check_population", "choose", "nsga2_search", "one_at_a_time", "pareto_front",
           "search_space_size", "size_problem"]

logger = logging.getLogger(__name__)

#: evaluate(mask, learning_rate) -> {"objectives": {name: value}, "trainable_parameters": int, ...extra fields}
Evaluate = Callable[[list[int], float], dict]
#: on_result(k, output, seconds): the output of job ``k`` of a batch of jobs, and the seconds it took
OnResult = Callable[[int, dict, float], None]
#: evaluate_many(jobs, on_result): evaluate every ``(mask, learning_rate)`` of ``jobs`` (in any order, at once or one
#: by one), calling ``on_result`` once per job as each finishes
EvaluateMany = Callable[[list[tuple[list[int], float]], OnResult], None]
#: run(jobs, on_result): the same for the jobs of :class:`MaskEvaluator` (dicts with ``mask`` (None: every unit),
#: ``learning_rate`` and optionally ``method`` and ``steps``); :meth:`MaskEvaluator.run` in this process, or workers
RunJobs = Callable[[list[dict], OnResult], None]
#: progress(stage, done, total): stage is "generation" or "evaluation"
Progress = Callable[[str, int, int], None]


#: bounds of the search's size, checked before anything runs: every evaluation is a fine-tune, so even the largest
#: search allowed is far beyond any budget, and NSGA-II's duplicate check and sorting grow with the population squared
MAX_POPULATION = 1_000
MAX_GENERATIONS = 10_000


def size_problem(population: int, generations: int) -> str | None:
    """What is wrong with a population and a generation count (``None`` when both are within bounds)."""
    if not 2 <= population <= MAX_POPULATION:
        return f"--population must be between 2 and {MAX_POPULATION:,} (got {population:,})"
    if not 1 <= generations <= MAX_GENERATIONS:
        return f"--generations must be between 1 and {MAX_GENERATIONS:,} (got {generations:,})"
    return None


def search_space_size(n_units: int, lr_choices: Sequence[float]) -> int:
    """How many distinct (mask, learning rate) candidates there are: ``2 ** n_units`` masks (the all-zero mask
    included: it is evaluated, on the untrained base) times the distinct learning rates (as :func:`key_of` tells them
    apart). NSGA-II removes duplicates, so its population can never be larger."""
    return 2 ** n_units * len({f"{float(lr):.6g}" for lr in lr_choices})


def check_population(population: int, n_units: int, lr_choices: Sequence[float], what: str = "the method") -> None:
    """ConfigError (naming ``--population``, the search space and the unit count) when ``population`` is larger than
    the search space of :func:`search_space_size`; ``what`` names the method in the message."""
    space = search_space_size(n_units, lr_choices)
    if population > space:
        n_lr = space // 2 ** n_units
        raise ConfigError(f"--population {population} is larger than the search space: {what} has {n_units} "
                          f"unit{'s' if n_units != 1 else ''}, so there are 2^{n_units} masks x {n_lr} learning "
                          f"rate{'s' if n_lr != 1 else ''} = {space} distinct candidates; pass --population {space} "
                          "or less (or search more units: --granularity layer, more --lr-choices).")


@dataclass
class SearchResult:
    rows: list[dict]  # every evaluation, in log order
    front: list[dict]  # the non-dominated feasible evaluations
    chosen: dict | None  # the front's pick (knee point or by preference)
    objectives: list[str]
    evaluated: int  # evaluations run in this call (the rest came from the log)
    history: list[dict] = field(default_factory=list)  # per generation: evaluations so far and the front size



def one_at_a_time(evaluate: Evaluate) -> EvaluateMany:
    """``evaluate`` as an :data:`EvaluateMany` that runs the jobs one after the other, in order, in this process."""

    def evaluate_many(jobs: list[tuple[list[int], float]], on_result: OnResult) -> None:
        for k, (mask, lr) in enumerate(jobs):
            t0 = time.perf_counter()
            out = evaluate(mask, lr)
            on_result(k, out, time.perf_counter() - t0)

    return evaluate_many


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


def nsga2_search(n_units: int, evaluate: Evaluate | None, log_path: str | os.PathLike, *, objectives: Sequence[str],
                 lr_choices: Sequence[float] = (1e-3,), population: int = 8, generations: int = 4, seed: int = 0,
                 max_trainable_percent: float | None = None, preference: Sequence[float] | None = None,
                 progress: Progress | None = None, on_evaluation: Callable[[dict], None] | None = None,
                 evaluate_many: EvaluateMany | None = None) -> SearchResult:
    """Run (or resume) NSGA-II over ``n_units`` mask bits and the learning rate; see :mod:`memaudit.mitigate.search`.

    ``evaluate_many`` (instead of ``evaluate``, which then may be None) gets the new masks of a generation at once
    (each distinct ``(mask, lr)`` not in the log, once), e.g. to run them concurrently; each result is logged as soon
    as every genome asked before it is, so the log is the one ``evaluate`` would write."""
    # pymoo's NSGA-II: a measured heavy import (about 4 s on two CPU cores, after torch), paid by a search only
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.pntx import TwoPointCrossover
    from pymoo.operators.mutation.bitflip import BitflipMutation
    from pymoo.operators.sampling.rnd import BinaryRandomSampling
    from pymoo.problems.static import StaticProblem

    if n_units < 1:
        raise ConfigError("the method has no units to mask; choose a method with trainable parameters.")
    problem_text = size_problem(population, generations)
    if problem_text:
        raise ConfigError(f"{problem_text}.")
    check_population(population, n_units, lr_choices)
    objectives = list(objectives)
    n_var = n_units + lr_bits(len(lr_choices))
    n_constr = 1 if max_trainable_percent is not None else 0
    problem = Problem(n_var=n_var, n_obj=len(objectives), n_ieq_constr=n_constr, xl=0, xu=1, vtype=bool)
    algorithm = NSGA2(pop_size=population, sampling=BinaryRandomSampling(), crossover=TwoPointCrossover(),
                      mutation=BitflipMutation(), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    if evaluate_many is None:
        if evaluate is None:
            raise TypeError("nsga2_search needs evaluate or evaluate_many.")
        evaluate_many = one_at_a_time(evaluate)
    log = EvaluationLog(log_path)
    evaluated, history, generation = 0, [], 0
    progress = progress or (lambda *_: None)
    # one generation at a time: nothing is allocated for all generations at once (pymoo's termination only counts)
    while algorithm.has_next():
        pop = algorithm.ask()
        if pop is None:  # duplicate removal left no new genome to try: the search space is exhausted
            logger.info("NSGA-II found no new mask to try after %d generations; stopping", generation)
            break
        genomes = pop.get("X")
        progress("generation", generation, generations)
        rows, ran = _evaluate_generation([decode(g, n_units, lr_choices) for g in genomes], evaluate_many, log,
                                         objectives, seed, generation, progress, on_evaluation)
        evaluated += ran
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


def _evaluate_generation(asked: list[tuple[list[int], float]], evaluate_many: EvaluateMany, log: EvaluationLog,
                         objectives: Sequence[str], seed: int, generation: int, progress: Progress,
                         on_evaluation: Callable[[dict], None] | None) -> tuple[list[dict], int]:
    """The rows of one generation's genomes (``asked``, decoded), in ask order: from the log, or evaluated now (each
    new key once: two genomes may decode to one mask and learning rate) and logged in ask order. Returns the rows and
    how many evaluations ran."""
    keys = [key_of(mask, lr) for mask, lr in asked]
    todo: list[int] = []  # positions whose key is new, first occurrence only
    new: set[str] = set()
    for k, key in enumerate(keys):
        if log.get(key) is None and key not in new:
            new.add(key)
            todo.append(k)
    rows: list[dict] = []

    def emit(k: int, item) -> None:
        row = log.get(keys[k])
        if row is None:  # evaluated now (a later genome with the same key finds this row in the log)
            out, seconds = item
            missing = [o for o in objectives if o not in out.get("objectives", {})]
            if missing:
                raise ConfigError(f"the evaluation returned no value for objective(s) {missing}.")
            mask, lr = asked[k]
            row = {**out, "key": keys[k], "mask": mask, "learning_rate": lr, "seed": seed,
                   "generation": generation, "index": len(log),
                   "objectives": {o: float(out["objectives"][o]) for o in out["objectives"]},
                   "wall_time_s": seconds}
            row.setdefault("trainable_percent", 0.0)
            log.append(row)
            if on_evaluation is not None:
                on_evaluation(row)
        rows.append(row)
        progress("evaluation", k + 1, len(asked))

    ordered = InOrder(len(asked), emit)
    for k in set(range(len(asked))) - set(todo):
        ordered.put(k)
    if todo:
        evaluate_many([asked[k] for k in todo], lambda j, out, seconds: ordered.put(todo[j], (out, seconds)))
    if not ordered.done:
        raise RuntimeError(f"{len(asked) - len(rows)} evaluation(s) of generation {generation} never came back.")
    return rows, len(todo)

