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

The modules: ``genome`` (mask and learning-rate encoding), ``log`` (the JSONL logs), ``nsga2`` (pymoo's ask/tell, the
size checks, the front and the pick), ``config`` (:class:`SearchConfig`, the objectives, ``search.json``'s identity),
``evaluator`` (:class:`MaskEvaluator`: the inner fine-tune and its scores), ``schedule`` (plain and screen, the
promotions), ``references`` (the reference fine-tunes and the verdict), ``workers`` (the evaluations on Ray workers)
and ``run`` (:func:`run_mask_search`, the recipe).
"""

from memaudit.mitigate.search.config import (
    MEMORIZATION,
    NOT_IN_IDENTITY,
    OBJECTIVES,
    OBJECTIVES_USAGE,
    QUALITY,
    SCHEDULES,
    SETTINGS_FILE,
    SearchConfig,
    check_resume,
    parse_objectives,
)
from memaudit.mitigate.search.evaluator import MaskEvaluator, method_units
from memaudit.mitigate.search.genome import decode, key_of, lr_bits
from memaudit.mitigate.search.log import LOG_FILE, EvaluationLog, InOrder
from memaudit.mitigate.search.nsga2 import (
    MAX_GENERATIONS,
    MAX_POPULATION,
    Evaluate,
    EvaluateMany,
    OnResult,
    Progress,
    RunJobs,
    SearchResult,
    check_population,
    choose,
    nsga2_search,
    one_at_a_time,
    pareto_front,
    search_space_size,
    size_problem,
)
from memaudit.mitigate.search.references import reference_verdict
from memaudit.mitigate.search.run import pareto_png, run_mask_search
from memaudit.mitigate.search.schedule import PROMOTED_FILE, row_inner_steps, spread_order
from memaudit.mitigate.search.workers import SearchWorker, SearchWorkerSpec, describe_job

__all__ = [
    "LOG_FILE", "MAX_GENERATIONS", "MAX_POPULATION", "MEMORIZATION", "NOT_IN_IDENTITY", "OBJECTIVES",
    "OBJECTIVES_USAGE", "PROMOTED_FILE", "QUALITY", "SCHEDULES", "SETTINGS_FILE", "Evaluate", "EvaluateMany",
    "EvaluationLog", "InOrder", "MaskEvaluator", "OnResult", "Progress", "RunJobs", "SearchConfig", "SearchResult",
    "SearchWorker", "SearchWorkerSpec", "check_population", "check_resume", "choose", "decode", "describe_job",
    "key_of", "lr_bits", "method_units", "nsga2_search", "one_at_a_time", "pareto_front", "pareto_png",
    "parse_objectives", "reference_verdict", "row_inner_steps", "run_mask_search", "search_space_size",
    "size_problem", "spread_order",
]
