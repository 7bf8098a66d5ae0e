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

Sizes: the population is at most :data:`MAX_POPULATION` and the generations at most :data:`MAX_GENERATIONS`, and
the population may not exceed the search space (:func:`search_space_size`: NSGA-II removes duplicates, so it could
never fill it); both are checked before anything runs or is written. NSGA-II is asked for one generation at a time,
so nothing grows with population x generations up front, and a search whose space is exhausted (no new genome left)
ends early.

Two schedules. ``plain``: every evaluation fine-tunes ``inner_steps``. ``screen`` (multi-fidelity): NSGA-II runs
on *screening* evaluations that fine-tune only ``screen_steps``; its front among them (or the ``promote`` masks of
it that spread along it best, its two ends first) is then fine-tuned for the full ``inner_steps`` and scored again
(``promoted.jsonl``, cached and resumable like the log), and the front and the pick are made among those full
evaluations only, so the chosen mask's scores are always full-fidelity ones.

Workers (``SearchConfig.workers > 1``, ``--workers N``): the evaluations of one NSGA-II generation, the promoted masks
of the screen schedule and the two references run concurrently on N Ray workers (:class:`SearchWorker`,
:class:`memaudit.distributed.RayWorkers`), one evaluation per worker at a time. Each worker loads the base model
once and holds its own :class:`MaskEvaluator` on the same proxy and validation splits; an evaluation depends only on
its mask, learning rate, steps, the seed and the settings (never on what ran before it in that process), so it does
not matter which worker runs it. Only this process (the driver) writes: it keeps NSGA-II, answers cached masks from
the logs (they are never sent to a worker), and logs each evaluation as soon as every one asked before it is logged,
so the logs, the front and the chosen mask are those of a search in one process with the same seed (CPU workers:
with the same torch threads per process), and killing and resuming works as above, with any number of workers. A
worker that dies is restarted and its evaluation runs again (:mod:`memaudit.distributed`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from memaudit.core.digests import tree_digest
from memaudit.core.errors import ConfigError, DataError
from memaudit.core.io import check_writable
from memaudit.core.outputs import check_cache, check_clear, check_output, dataset_inputs, write_marker
from memaudit.core.provenance import machine, versions
from memaudit.core.runs import differences, listed

logger = logging.getLogger(__name__)

LOG_FILE = "evaluations.jsonl"
SETTINGS_FILE = "search.json"

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


class InOrder:
    """Hands items that arrive in any order (``put(k, item)``, ``k`` in ``0..n-1``) to ``emit(k, item)`` in order of
    ``k``: each as soon as it and every item before it are in."""

    def __init__(self, n: int, emit: Callable[[int, object], None]):
        self.n, self.emit, self.waiting, self.next = n, emit, {}, 0

    def put(self, k: int, item=None) -> None:
        self.waiting[k] = item
        while self.next in self.waiting:
            k, self.next = self.next, self.next + 1
            self.emit(k, self.waiting.pop(k))

    @property
    def done(self) -> bool:
        return self.next == self.n


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
    """Run (or resume) NSGA-II over ``n_units`` mask bits and the learning rate; see the module docstring.

    ``evaluate_many`` (instead of ``evaluate``, which then may be None) gets the new masks of a generation at once
    (each distinct ``(mask, lr)`` not in the log, once), e.g. to run them concurrently; each result is logged as soon
    as every genome asked before it is, so the log is the one ``evaluate`` would write."""
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


# -- MemControl's search on a real model ------------------------------------------------------------------------
MEMORIZATION = ("denoising", "extraction", "amd")
SCHEDULES = ("plain", "screen")
PROMOTED_FILE = "promoted.jsonl"
QUALITY = ("kid", "fid")
OBJECTIVES_USAGE = (f"--objectives takes MEM,QUALITY with MEM one of {'|'.join(MEMORIZATION)} and QUALITY one of "
                    f"{'|'.join(QUALITY)} (default denoising,kid)")


def parse_objectives(text: str) -> tuple[str, str]:
    """``--objectives MEM,QUALITY`` (e.g. ``denoising,kid``, case ignored) as (memorization, quality); a one-line
    ConfigError naming ``--objectives`` and the accepted values otherwise."""
    parts = [p.strip().lower() for p in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--objectives {text!r} is not two names; {OBJECTIVES_USAGE}.")
    mem, quality = parts
    if mem in QUALITY and quality in MEMORIZATION:
        raise ConfigError(f"--objectives {text!r} has the order reversed: pass {quality},{mem} "
                          "(memorization first, then quality).")
    wrong = [f"{name!r} is not a {kind} objective" for name, kind, known in
             ((mem, "memorization", MEMORIZATION), (quality, "quality", QUALITY)) if name not in known]
    if wrong:
        raise ConfigError(f"--objectives {text!r}: {' and '.join(wrong)}; {OBJECTIVES_USAGE}.")
    return mem, quality


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class SearchConfig:
    """Settings of :func:`run_mask_search`; each field's ``help`` metadata documents it."""

    method: str = _help("PEFT method whose units the mask switches", default="svdiff")
    granularity: str = _help("mask units: block (one per transformer block, plus the rest) or layer", default="block")
    population: int = _help("NSGA-II population", default=8)
    generations: int = _help("NSGA-II generations", default=4)
    lr_choices: tuple = _help("learning rates the search chooses from", default=(3e-4, 1e-3, 3e-3, 1e-2))
    inner_steps: int = _help("fine-tuning steps of each evaluation", default=200)
    batch_size: int = _help("images per fine-tuning step", default=32)
    proxy_fraction: float = _help("share of the training images the inner loop fine-tunes on", default=0.5)
    val_fraction: float = _help("share of the training images held out for the quality objective", default=0.2)
    memorization: str = _help("memorization objective: denoising (training-time strength on the proxy images), "
                              "extraction (extracted proxy images), amd (negated AMD of proxy generations)",
                              default="denoising")
    quality: str = _help("quality objective on the validation split: kid or fid", default="kid")
    quality_features: str = _help("feature space of the quality objective", default="pixels")
    generations_per_prompt: int = _help("generations per caption when an objective samples", default=4)
    sample_steps: int = _help("denoising steps when an objective samples", default=25)
    guidance: float = _help("guidance scale when an objective samples", default=4.0)
    min_clique: int = _help("extraction objective: clique size that flags a caption", default=3)
    max_trainable_percent: float | None = _help("constraint: at most this share of the denoiser trains", default=None)
    preference: tuple | None = _help("weights (memorization, quality) for the pick; None: the knee point", default=None)
    schedule: str = _help("plain: every evaluation fine-tunes inner_steps; screen: NSGA-II runs on short screening "
                          "fine-tunes (screen_steps), then only the screening front is fine-tuned for inner_steps, "
                          "and the pick is made among those", default="plain")
    screen_steps: int | None = _help("screen: fine-tuning steps of a screening evaluation (None: inner_steps // 5)",
                                     default=None)
    promote: int | None = _help("screen: at most this many masks of the screening front are fine-tuned for "
                                "inner_steps, spread along it (its two ends first); None: the whole front",
                                default=None)
    seed: int = _help("seed of the search, the splits, every fine-tune and every sample", default=0)
    device: str = _help("auto, cpu or cuda", default="auto")
    loras: list = _help("LoRA adapters fused into the base before the search: [[path, scale], ...]", default_factory=list)
    workers: int = _help("run the evaluations on this many Ray workers, one model replica each (1: in this process, "
                         "without Ray); the results are the same", default=1)
    ray_address: str | None = _help("Ray cluster of the workers (as `ray start --head` prints it); None: a local Ray "
                                    "instance", default=None)

    def __post_init__(self):
        from memaudit.mitigate.methods import GRANULARITIES, available_methods

        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1 (1 runs the search in this process).")
        if self.ray_address is not None and self.workers == 1:
            raise ConfigError("--ray-address needs --workers 2 or more: one worker runs in this process, without Ray.")
        self.lr_choices = tuple(float(x) for x in self.lr_choices)
        if self.schedule == "screen" and self.screen_steps is None:
            self.screen_steps = max(1, self.inner_steps // 5)
        if self.preference is not None:
            self.preference = tuple(float(x) for x in self.preference)
        checks = [
            (self.method in available_methods() and self.method not in ("full", "freeze"),
             f"--method must be a PEFT method with units to search: {', '.join(available_methods())} (not full/freeze)"),
            (self.granularity in GRANULARITIES, "--granularity must be block or layer"),
            (size_problem(self.population, self.generations) is None,
             size_problem(self.population, self.generations)),
            (len(self.lr_choices) >= 1 and all(x > 0 for x in self.lr_choices), "learning rate choices must be > 0"),
            (self.inner_steps >= 1, "--inner-steps must be at least 1"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.screen_steps is None or 1 <= self.screen_steps <= self.inner_steps,
             "--screen-steps must be between 1 and --inner-steps"),
            (self.promote is None or self.promote >= 1, "--promote must be at least 1"),
            (0 < self.proxy_fraction <= 1, "--proxy-fraction must be in (0, 1]"),
            (0 < self.val_fraction < 1, "the validation fraction must be in (0, 1)"),
            (self.memorization in MEMORIZATION, f"the memorization objective {self.memorization!r} (the first name "
                                                f"of --objectives) is not one of {'|'.join(MEMORIZATION)}"),
            (self.quality in QUALITY, f"the quality objective {self.quality!r} (the second name of --objectives) "
                                      f"is not one of {'|'.join(QUALITY)}"),
            (self.generations_per_prompt >= 1 and self.sample_steps >= 1, "sampling settings must be >= 1"),
            (2 <= self.min_clique <= self.generations_per_prompt or self.memorization != "extraction",
             "the extraction objective needs 2 <= min clique <= generations per prompt"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"search setting invalid: {msg}.")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


OBJECTIVES = ("memorization", "quality")
#: settings that do not change a result: a search resumes with any other value of them
NOT_IN_IDENTITY = ("workers", "ray_address")


def method_units(target, config: SearchConfig) -> tuple[list, dict]:
    """The units of ``config.method`` at ``config.granularity`` on ``target``'s denoiser, and the method's summary
    (parameter counts): read off the method built on the denoiser, which is then taken out again."""
    from memaudit.mitigate.methods import get_method

    probe = get_method(config.method, target.denoiser, config.granularity, base=target.path or None)
    try:
        return probe.units(), probe.summary()
    finally:
        probe.unload()


class MaskEvaluator:
    """Fine-tunes the base denoiser with a mask on the proxy split and scores it (the inner loop).

    Every evaluation works on the target's own denoiser, never on a copy (a copy of SDXL's UNet is 10 GB, Flux's
    transformer 48 GB in float32): the method is installed on it, trained and scored, then taken out again without
    merging (:meth:`memaudit.mitigate.methods.PEFTMethod.unload`), so what it installed (spectral shifts, scales, LoRA
    factors) is dropped and the plain layers come back with their own parameters. The base parameters the mask
    trains directly (``full``, ``attention``, ``bias``, ``norm``, DiffFit's biases and norms;
    :meth:`~memaudit.mitigate.methods.PEFTMethod.base_parameters`) are copied to the CPU before training and copied
    back afterwards: only those tensors, and only for the evaluation's duration. SV-DIFF and LoRA copy nothing; full
    fine-tuning (the reference evaluation) is the one case that copies every denoiser parameter. After each
    evaluation the denoiser is bit-for-bit the base again (same tensors, ``requires_grad`` flags, no gradients, eval
    mode), so every evaluation starts from the same base, as with a fresh copy.

    Images are streamed: the proxy images' latents come from the latent cache in ``cache_dir`` (default: memaudit's
    cache folder; :mod:`memaudit.latents`), filled at the first evaluation and found by every later one (and by later
    searches and fine-tunes on the same images); the validation and proxy images' features are computed a batch of
    ``batch_size`` images at a time.
    """

    def __init__(self, target, proxy, val, config: SearchConfig, progress: Progress | None = None,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 64):
        from memaudit.features import get_extractor

        self.target, self.proxy, self.val, self.config = target, proxy, val, config
        self.cache_dir, self.batch_size = cache_dir, batch_size
        self.progress = progress or (lambda *_: None)
        self.units, self.summary = method_units(target, config)
        self.extractor = get_extractor(config.quality_features, device=str(target.device))
        # the features of the validation and proxy images are computed at the first evaluation (never, when every
        # evaluation comes from the logs)

    def _features(self, dataset):
        import torch

        parts = [self.extractor((x + 1) / 2) for _, x in dataset.batches(self.batch_size)]
        return torch.cat(parts)

    @cached_property
    def val_features(self):
        return self._features(self.val)

    @cached_property
    def proxy_features(self):
        return self._features(self.proxy)

    @cached_property
    def latents(self):
        """The proxy images' VAE posteriors in the latent cache (encoded at the first use if the cache lacks them)."""
        from memaudit.latents import latents_for

        return latents_for(self.target, self.proxy, self.cache_dir,
                           progress=lambda done, total: self.progress("latent cache", done, total))

    @property
    def cache_report(self) -> dict | None:
        """What the latent cache held and encoded for this search (None when no evaluation ran)."""
        return self.latents.report if "latents" in self.__dict__ else None

    @cached_property
    def proxy_latents(self):
        return self.latents.means()

    def fresh(self, method: str | None = None):
        """``method`` (default: the searched one) installed on the target's denoiser, in place; the caller takes it
        out again with ``unload()`` (as :meth:`__call__` does)."""
        from memaudit.mitigate.methods import get_method

        return get_method(method or self.config.method, self.target.denoiser, self.config.granularity,
                          base=self.target.path or None)

    def __call__(self, mask: list[int] | None, lr: float, method: str | None = None, steps: int | None = None) -> dict:
        """Fine-tune with ``mask`` (None: every unit) at ``lr`` for ``steps`` (default: the inner steps) and score;
        ``method`` overrides the searched one. The denoiser is the base again afterwards (see the class docstring),
        also when training or scoring fails."""
        import torch

        from memaudit.train import TrainConfig, train_unet

        cfg = self.config
        steps = cfg.inner_steps if steps is None else steps
        denoiser = self.target.denoiser
        was_training = denoiser.training
        peft = self.fresh(method)
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            params = peft.parameters_for(mask if mask is not None else [1] * len(peft.units()))
            n = sum(p.numel() for p in params)
            # the base tensors training will change in place, kept on the CPU until the evaluation ends
            saved = [(p, p.detach().to("cpu", copy=True)) for p in peft.base_parameters(params)]
            if params:
                train_unet(self.target, self.proxy, TrainConfig(steps=steps, batch_size=cfg.batch_size,
                                                                learning_rate=lr, seed=cfg.seed, log_every=0),
                           params=params, progress=lambda s, t, _logs: self.progress("step", s, t),
                           latents=self.latents)
            denoiser.eval()
            mem, details = self.memorization()
            quality = self.quality()
        finally:
            with torch.no_grad():
                for p, copy in saved:
                    p.copy_(copy)
            peft.unload()
            denoiser.train(was_training)
        return {"objectives": {"memorization": mem, "quality": quality}, "trainable_parameters": n,
                "trainable_percent": 100.0 * n / self.summary["unet_parameters"], "details": details,
                "inner_steps": steps if params else 0}

    def run(self, jobs: list[dict], on_result: OnResult) -> None:
        """Evaluate ``jobs`` one after the other in this process (a :data:`RunJobs`): each a dict with ``mask``
        (None: every unit), ``learning_rate`` and optionally ``method`` and ``steps``, as :meth:`__call__` takes
        them."""
        for k, job in enumerate(jobs):
            t0 = time.perf_counter()
            out = self(job.get("mask"), job["learning_rate"], method=job.get("method"), steps=job.get("steps"))
            on_result(k, out, time.perf_counter() - t0)

    def _sample(self, captions: list[str], seed: int):
        from memaudit.sampling import Sampler

        cfg = self.config
        sampler = Sampler(self.target, steps=cfg.sample_steps, guidance=cfg.guidance, batch_size=64, seed=seed)
        return list(sampler.run(captions, cfg.generations_per_prompt))

    def memorization(self) -> tuple[float, dict]:
        import torch

        cfg = self.config
        if cfg.memorization == "denoising":
            from memaudit.attacks.denoising import training_strength

            g = torch.Generator().manual_seed(cfg.seed)
            reps = [training_strength(self.target, self.proxy_latents, self.proxy.captions, generator=g)
                    for _ in range(4)]
            value = float(torch.stack(reps).mean())
            return value, {"denoising_strength": value}
        batches = self._sample(self.proxy.captions, cfg.seed + 2)
        images = torch.cat([b.images for b in batches])
        if cfg.memorization == "amd":
            from memaudit.metrics.amd import amd_bruteforce

            feats = self.extractor(images).numpy()
            value = float(amd_bruteforce(feats, self.proxy_features.numpy()).amd)
            return -value, {"amd": value}
        from memaudit.attacks.extraction import ExtractionConfig, analyze_prompt

        ext = ExtractionConfig(min_clique=cfg.min_clique)
        per = images.reshape(len(self.proxy), cfg.generations_per_prompt, *images.shape[1:])
        extracted = 0
        # each prompt's medoid is compared with its own image only: the proxy images are read a batch at a time
        for index, x in self.proxy.batches(self.batch_size):
            for k, i in enumerate(index.tolist()):
                extracted += analyze_prompt(per[i], ext, (x[k : k + 1] + 1) / 2, 0).extracted
        return float(extracted), {"extracted": int(extracted)}

    def quality(self) -> float:
        import torch

        from memaudit.metrics.quality import fid_from_features, kid_from_features

        batches = self._sample(self.val.captions, self.config.seed + 3)
        fake = self.extractor(torch.cat([b.images for b in batches]))
        if self.config.quality == "fid":
            return float(fid_from_features(self.val_features, fake))
        return float(kid_from_features(self.val_features, fake, seed=self.config.seed)[0])


def run_mask_search(base, train, out: str | os.PathLike, config: SearchConfig | None = None, *,
                    convert_channels: bool = False, progress: Progress | None = None,
                    cache_dir: str | os.PathLike | None = None) -> dict:
    """MemControl's bi-level search on ``base`` and ``train``; writes ``out/`` (log, front, plot, chosen mask).

    The proxy images' latents are kept in the latent cache in ``cache_dir`` (default: memaudit's cache folder; see
    :mod:`memaudit.latents`): encoded once (progress stage ``"latent cache"``), then found by every evaluation, by a
    rerun of the search and by a fine-tune on the same images. ``latent_cache`` in the result says what it held.

    Returns the document also written to ``pareto.json``. Besides the front, the pick and the references, it says
    what the search cost and what it found: ``fine_tunes`` (``total`` = ``mask_evaluations`` + one per name in
    ``references``, ``run_now``, ``without_training``: all-zero masks scored on the base model; with the screen
    schedule also ``screening`` and ``promoted``) and ``verdict`` (:func:`reference_verdict`: whether a reference
    such as full fine-tuning beats every mask on the front). A population larger than the search space
    (:func:`check_population`) is refused once the units are known, before anything is written.

    ``config.workers > 1`` runs the evaluations on that many Ray workers (see the module docstring; ``base`` must be
    a folder or hub id every worker can load, and the training images at paths every worker can read). Ray missing,
    a ``ray_address`` that does not answer or a cluster too small for the workers is one line, before anything is
    written. The workers start at the first evaluation not in the logs (a search found complete starts none), and
    ``workers``, ``ray_address`` and the versions (with Ray's) are recorded in the result; the logs and ``search.json``
    do not depend on them, so a search resumes with any number of workers.
    """
    import torch

    from memaudit.core.io import atomic_write_bytes, atomic_write_json
    from memaudit.data import dataset_for_target
    from memaudit.latents import latent_cache_root
    from memaudit.target import load_target

    config = config or SearchConfig()
    distributed = config.workers > 1
    if distributed:
        from memaudit.distributed import check_reachable, require_ray

        require_ray("the search")  # missing, or an address that does not answer: one line, before anything loads
        check_reachable(config.ray_address)
    cache_root = check_writable(latent_cache_root(cache_dir), "--cache-dir")
    # the search adds its files to --out as it goes (it resumes from them): a new or empty folder, or its own
    named = [("the base model", base if isinstance(base, (str, os.PathLike)) else None),
             ("--train", train if isinstance(train, (str, os.PathLike)) else None), ("--cache-dir", cache_root.parent),
             *[("--lora", lora[0]) for lora in config.loras]]
    out = check_output(out, "search", named, replaces=False)
    check_cache(cache_root.parent, named)
    # resuming with other settings, base or data is refused before the model loads (the splits once the data is read)
    early = _identity_before_loading(base, train, config)
    check_resume(out, early)
    # with workers, this copy only answers questions about the model (its units, resolution, ...): on the CPU
    target = load_target(base, device="cpu" if distributed else config.device, dtype="float32", loras=config.loras)
    dataset, source = dataset_for_target(train, target, convert_channels)
    check_clear(out, dataset_inputs(dataset, "the training images"))  # a captions file can name images anywhere
    if len(dataset) < 4:
        raise ConfigError(f"the training set {source} has {len(dataset)} images; the search needs at least 4.")
    splits = dataset.split(seed=config.seed, val=config.val_fraction, test=0.0)
    rest, val = splits["train"], splits["val"]
    n_proxy = max(1, round(config.proxy_fraction * len(rest)))
    proxy = rest.subset(torch.randperm(len(rest), generator=torch.Generator().manual_seed(config.seed))[:n_proxy].sort().values)
    # lists the method's units (built on the denoiser and taken out again); nothing is written yet
    evaluator = None if distributed else MaskEvaluator(target, proxy, val, config, progress, cache_dir=cache_dir)
    units = evaluator.units if evaluator is not None else method_units(target, config)[0]
    if not units:
        raise ConfigError(f"--method {config.method} has nothing to train on {base} (its "
                          f"{type(target.denoiser).__name__} has no {config.method} parameters), so there is no mask "
                          "to search; choose another --method.")
    check_population(config.population, len(units), config.lr_choices,
                     f"{config.method} at {config.granularity} granularity")
    settings = {"kind": "memaudit.search", "schema_version": 1, "base": str(base),
                "base_sha256": early["base_sha256"], "train": source,
                "train_sha256": dataset.content_key(captions=True), "settings": config.to_dict(),
                "proxy": list(proxy.names), "validation": list(val.names)}
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples become lists)
    settings_file = out / SETTINGS_FILE
    check_resume(out, settings)
    pool = None
    if distributed:
        from memaudit.distributed import RayWorkers

        # unreachable, too small for the workers: one line, nothing written
        pool = RayWorkers(config.workers, address=config.ray_address, device=config.device,
                          threads=torch.get_num_threads(), what="the search", name="search")
    try:
        vers = versions()
        if pool is not None:
            vers["ray"] = pool.ray_version
        if not settings_file.is_file():
            out.mkdir(parents=True, exist_ok=True)
            write_marker(out, "search", listed=False)
            atomic_write_json(settings_file, {**settings, "versions": vers})
        if pool is None:
            run: RunJobs = evaluator.run
        else:
            model_arg = str(Path(base).resolve()) if Path(str(base)).exists() else str(base)
            run = _OnWorkers(pool, SearchWorkerSpec(
                base=model_arg, loras=[[a["path"], a["scale"]] for a in target.loras], config=config.to_dict(),
                proxy=_absolute(proxy), val=_absolute(val), device=pool.device_type,
                threads=pool.threads if pool.device_type == "cpu" else None,
                cache_dir=str(latent_cache_root(cache_dir).parent.resolve())), progress)
        doc = _search(run, out, config, len(units), progress)
    finally:
        if pool is not None:
            pool.close()
    cache_report = evaluator.cache_report if evaluator is not None else run.cache_report
    rows, front, chosen, references = doc["rows"], doc["front"], doc["chosen"], doc["references"]
    mask_doc = {"kind": "memaudit.mask", "schema_version": 1, "method": config.method,
                "granularity": config.granularity, "units": [u.name for u in units],
                "unit_parameters": [u.count for u in units], "base": str(base), "family": target.family.name,
                "denoiser": type(target.denoiser).__name__, "seed": config.seed,
                "inner_steps": config.inner_steps, "schedule": config.schedule,
                "pick": "knee point" if config.preference is None
                else f"weighted sum {list(config.preference)}"}
    if chosen is not None:
        mask_doc.update({"mask": chosen["mask"], "learning_rate": chosen["learning_rate"],
                         "objectives": chosen["objectives"], "trainable_parameters": chosen["trainable_parameters"],
                         "trainable_percent": chosen["trainable_percent"]})
        atomic_write_json(out / "mask.json", mask_doc)
    screen, result, evaluated = config.schedule == "screen", doc["result"], doc["evaluated"]
    all_rows = result.rows + (rows if screen else [])
    fine_tunes = {"total": len(all_rows) + len(references), "mask_evaluations": len(all_rows),
                  "references": list(references), "run_now": evaluated + doc["references_now"],
                  "without_training": sum(1 for r in all_rows if row_inner_steps(r, config.inner_steps) == 0)}
    if screen:
        fine_tunes.update(screening=len(result.rows), promoted=len(rows))
    front_doc = {"objectives": list(OBJECTIVES), "front": front, "chosen": chosen, "references": references,
                 "evaluations": len(all_rows), "evaluated_now": evaluated, "history": result.history,
                 "fine_tunes": fine_tunes, "verdict": reference_verdict(front, references),
                 "memorization": config.memorization, "quality": config.quality, "schedule": config.schedule,
                 "inner_steps_total": sum(row_inner_steps(r, config.inner_steps) for r in all_rows),
                 "latent_cache": cache_report, "workers": config.workers, "ray_address": config.ray_address,
                 "versions": vers}
    if screen:
        front_doc["screening"] = {"evaluations": len(result.rows), "steps": config.screen_steps,
                                  "promoted": len(rows), "promote": config.promote,
                                  "front": result.front}
    atomic_write_json(out / "pareto.json", front_doc)
    atomic_write_bytes(out / "pareto.png", pareto_png(rows, front, chosen, references, config))
    return front_doc


def _search(run: RunJobs, out: Path, config: SearchConfig, n_units: int, progress: Progress | None) -> dict:
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
        rows, evaluated_full = _promote(run, result.front, out, config, progress)
        evaluated += evaluated_full
        front = pareto_front(rows, OBJECTIVES, config.max_trainable_percent)
        chosen = choose(front, OBJECTIVES, config.preference)
    # references: the method's default (every unit, its default learning rate) and full fine-tuning
    references, references_now = _references(run, out, config)
    return {"result": result, "rows": rows, "front": front, "chosen": chosen, "evaluated": evaluated,
            "references": references, "references_now": references_now}


def _identity(settings: dict) -> dict:
    """``search.json``'s settings without those that do not change a result (:data:`NOT_IN_IDENTITY`)."""
    inner = {k: v for k, v in (settings.get("settings") or {}).items() if k not in NOT_IN_IDENTITY}
    return {**settings, "settings": inner}


#: search settings by the option that sets them, where that is not ``--`` and the name
_OPTION_OF = {"memorization": "--objectives", "quality": "--objectives", "loras": "--lora/--lora-scale"}
#: the other parts of ``search.json``'s identity, by what they are
_PART_OF = {"base": "the base model", "base_sha256": "the base model's files", "train": "--train",
            "train_sha256": "the training images' contents", "proxy": "the training images (proxy split)",
            "validation": "the training images (validation split)", "kind": "the search.json format",
            "schema_version": "the search.json format"}


def _identity_before_loading(base, train, config: SearchConfig) -> dict:
    """The part of ``search.json``'s identity known before the model and the data are loaded."""
    source = str(train) if isinstance(train, (str, os.PathLike)) else (getattr(train, "source", None)
                                                                        or "in-memory dataset")
    base_sha256 = tree_digest(base) if isinstance(base, (str, os.PathLike)) and Path(base).is_dir() else None
    return json.loads(json.dumps({"kind": "memaudit.search", "schema_version": 1, "base": str(base),
                                  "base_sha256": base_sha256, "train": source, "settings": config.to_dict()}))


def check_resume(out: Path, now: dict) -> None:
    """ConfigError (one line naming what differs) when ``out`` holds a search whose ``search.json`` differs from
    ``now`` (an identity as :func:`run_mask_search` writes it, or the part of it known so far) in a setting that
    changes results; nothing when ``out`` holds no search."""
    settings_file = Path(out) / SETTINGS_FILE
    if not settings_file.is_file():
        return
    try:
        earlier = json.loads(settings_file.read_text())
        if not isinstance(earlier, dict) or not isinstance(earlier.get("settings", {}), dict):
            raise ValueError("not a search description")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{settings_file} is unreadable ({str(e).splitlines()[0]}), so the search in {out} cannot be "
                          f"resumed; delete {out} to start it over, or choose another --out.") from e
    for key, default in (("schedule", "plain"), ("screen_steps", None), ("promote", None)):  # older logs
        earlier.setdefault("settings", {}).setdefault(key, default)
    a, b = _identity({k: earlier.get(k) for k in now}), _identity(now)
    if a != b:
        names = differences(a, b, options=_OPTION_OF, parts=_PART_OF)
        what = listed(names) if names else "settings"
        raise ConfigError(f"{out} holds a search made with other settings, base or data (differing: {what}); run the "
                          "same command as before to resume it, or choose another --out.")


def _absolute(dataset):
    """``dataset`` with absolute image paths (a worker's working folder may be another one)."""
    from memaudit.data import ImageCaptionDataset

    if not dataset.on_disk:
        return dataset
    return ImageCaptionDataset(dataset.captions, dataset.names, dataset.source,
                               files=[f.resolve() for f in dataset.files], resolution=dataset.resolution,
                               channels=dataset.channels, digests=dataset.file_digests())


def describe_job(job: dict) -> str:
    """An evaluation, as messages name it."""
    lr = f"lr {float(job['learning_rate']):g}"
    if job.get("mask") is None:
        return f"the evaluation of {job.get('method') or 'the method'} with every unit at {lr}"
    return f"the evaluation of mask {''.join(str(int(b)) for b in job['mask'])} at {lr}"


@dataclass
class SearchWorkerSpec:
    """What a worker process needs to build its own :class:`MaskEvaluator`: the base model (a folder or hub id it can
    reach, and adapters ``[[path, scale], ...]``), the search settings, the proxy and validation splits (their image
    paths, or their pixels for data held in memory), its device and CPU threads, and the cache folder."""

    base: str
    loras: list
    config: dict
    proxy: object
    val: object
    device: str
    threads: int | None = None
    cache_dir: str | None = None


class SearchWorker:
    """Runs evaluations of the search: the same :class:`MaskEvaluator` as in the driver, in a Ray worker."""

    def __init__(self, evaluator: MaskEvaluator):
        self.evaluator = evaluator

    @classmethod
    def load(cls, spec: SearchWorkerSpec) -> SearchWorker:
        """Load the base model of ``spec`` in this process (a Ray worker) and build the evaluator on its splits."""
        import torch

        from memaudit.target import load_target

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        config = SearchConfig(**spec.config)
        target = load_target(spec.base, device=spec.device, dtype="float32", loras=spec.loras)
        return cls(MaskEvaluator(target, spec.proxy, spec.val, config, cache_dir=spec.cache_dir))

    def machine(self) -> str:
        return machine(self.evaluator.target.device)

    def prepare(self) -> dict:
        """The proxy images' latents, from the latent cache (encoded into it when it lacks them); what it held."""
        return self.evaluator.latents.report

    def run_unit(self, task: dict) -> dict:
        """One evaluation (a job of :meth:`MaskEvaluator.run` with its ``position``): its result and seconds."""
        t0 = time.perf_counter()
        result = self.evaluator(task.get("mask"), task["learning_rate"], method=task.get("method"),
                                steps=task.get("steps"))
        return {"position": task["position"], "result": result, "wall_time_s": time.perf_counter() - t0}


class _OnWorkers:
    """A :data:`RunJobs` on Ray workers: started at the first jobs (worker 0 fills the latent cache first, then the
    others find it), then every call's jobs are dispatched at once, one per worker at a time."""

    def __init__(self, pool, spec: SearchWorkerSpec, progress: Progress | None):
        self.pool, self.spec, self.progress = pool, spec, progress or (lambda *_: None)
        self.started, self.cache_report = False, None

    def __call__(self, jobs: list[dict], on_result: OnResult) -> None:
        if not jobs:
            return
        if not self.started:
            self.pool.start(SearchWorker.load, self.spec)
            self.pool.ready(self.progress)
            self.started = True
            # the latent cache of the proxy images: filled by worker 0, then found by the others (no two workers
            # encode the same images at once)
            self.cache_report = self.pool.call("prepare", what="filling the latent cache")
            self.pool.call_each("prepare", what="reading the latent cache", actors=range(1, self.pool.n))
            encoded = int(self.cache_report.get("encoded", 0))
            if encoded:
                self.progress("latent cache", encoded, encoded)
        # one evaluation at a time per worker, all dispatched at once; an evaluation whose worker died runs again
        tasks = [{**job, "position": k} for k, job in enumerate(jobs)]
        self.pool.run(tasks, lambda out: on_result(int(out["position"]), out["result"], float(out["wall_time_s"])),
                      describe=describe_job, in_flight=1)


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


def _promote(run: RunJobs, screening_front: Sequence[dict], out: Path, config: SearchConfig,
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


def _references(run: RunJobs, out: Path, config: SearchConfig) -> tuple[dict, int]:
    """The method's default (every unit at its default learning rate) and full fine-tuning, scored the same way as
    the search's evaluations (cached in ``references.jsonl``, written in that order), and how many of them were
    fine-tuned now."""
    from memaudit.mitigate.methods import method_class

    log = EvaluationLog(out / "references.jsonl")
    wanted = []
    for name, method in (("method default", config.method), ("full fine-tuning", "full")):
        lr = method_class(method).default_lr
        wanted.append((name, method, lr, f"{method}:all-units@{lr:.6g}"))
    todo = [k for k, (_, _, _, key) in enumerate(wanted) if log.get(key) is None]

    def emit(k: int, item) -> None:
        _, method, lr, key = wanted[k]
        if item is not None:
            res, seconds = item
            log.append({**res, "key": key, "method": method, "learning_rate": lr, "wall_time_s": seconds})

    ordered = InOrder(len(wanted), emit)
    for k in set(range(len(wanted))) - set(todo):
        ordered.put(k)
    run([{"mask": None, "learning_rate": wanted[k][2], "method": wanted[k][1]} for k in todo],
        lambda j, res, seconds: ordered.put(todo[j], (res, seconds)))
    return {name: log.get(key) for name, _, _, key in wanted}, len(todo)


def reference_verdict(front: Sequence[dict], references: dict[str, dict],
                      objectives: Sequence[str] = OBJECTIVES) -> dict:
    """How the masks on the front compare with the references (every objective minimized).

    Returns ``status``:

    - ``"no front"``: the front is empty (no mask met the constraint);
    - ``"reference dominates"``: some reference is better than or equal to every mask on the front on every
      objective, i.e. no mask beats it on any (``dominating`` names them; ``strictly`` those better on every
      objective than every mask): the chosen mask is only the best of the masks;
    - ``"references unbeaten"``: no single reference does that, but on each objective the best reference
      (``best_reference``) is at least as good as every mask, so no mask beats the references on either objective;
    - ``"masks competitive"``: some mask beats the best reference on some objective.

    ``masks_better[reference][objective]`` counts the masks on the front strictly better than the reference on that
    objective; ``front_size`` is the number of masks compared.
    """
    objectives = list(objectives)
    out: dict = {"front_size": len(front), "dominating": [], "strictly": [], "best_reference": {}, "masks_better": {}}
    if not references:
        return {**out, "status": "no references"}
    names = list(references)
    ref = np.array([[references[n]["objectives"][o] for o in objectives] for n in names], dtype=float)
    out["best_reference"] = {o: names[int(np.argmin(ref[:, j]))] for j, o in enumerate(objectives)}
    if not front:
        return {**out, "status": "no front"}
    pts = np.array([[r["objectives"][o] for o in objectives] for r in front], dtype=float)
    for i, name in enumerate(names):
        better = pts < ref[i]  # [mask, objective]: the mask beats the reference on that objective
        out["masks_better"][name] = {o: int(better[:, j].sum()) for j, o in enumerate(objectives)}
        if not better.any():
            out["dominating"].append(name)
            if (ref[i] < pts).all():
                out["strictly"].append(name)
    if out["dominating"]:
        status = "reference dominates"
    elif (pts >= ref.min(0)).all():
        status = "references unbeaten"
    else:
        status = "masks competitive"
    return {**out, "status": status}


def pareto_png(rows: Sequence[dict], front: Sequence[dict], chosen: dict | None, references: dict,
               config: SearchConfig) -> bytes:
    from memaudit.report import figure_png, new_figure

    fig = new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    x = [r["objectives"]["memorization"] for r in rows]
    y = [r["objectives"]["quality"] for r in rows]
    ax.scatter(x, y, s=14, c="#9aa5b1", label=f"evaluations ({len(rows)})")
    f = sorted(front, key=lambda r: r["objectives"]["memorization"])
    ax.plot([r["objectives"]["memorization"] for r in f], [r["objectives"]["quality"] for r in f], "o-", c="#c0392b",
            ms=5, label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen["objectives"]["memorization"]], [chosen["objectives"]["quality"]], s=120, facecolors="none",
                   edgecolors="#c0392b", linewidths=2, label="chosen")
    for (name, r), marker in zip(references.items(), ("s", "^")):
        ax.scatter([r["objectives"]["memorization"]], [r["objectives"]["quality"]], marker=marker, s=60, c="#2c3e50",
                   label=name)
    ax.set_xlabel(f"memorization ({config.memorization}; lower is better)")
    ax.set_ylabel(f"quality ({config.quality.upper()}, {config.quality_features}; lower is better)")
    ax.set_title(f"MemControl mask search: {config.method}, {config.granularity} units")
    ax.legend(fontsize=8)
    return figure_png(fig)
