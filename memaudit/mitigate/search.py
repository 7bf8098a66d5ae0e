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

from memaudit.errors import ConfigError, DataError
from memaudit.io import check_writable

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

    def __post_init__(self):
        from memaudit.mitigate.methods import GRANULARITIES, available_methods

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
        # the units are read off the method built on the denoiser, which is then taken out again
        probe = self.fresh()
        try:
            self.units = probe.units()
            self.summary = probe.summary()
        finally:
            probe.unload()
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
    """
    import torch

    from memaudit.data import dataset_for_target
    from memaudit.io import atomic_write_bytes, atomic_write_json
    from memaudit.latents import latent_cache_root
    from memaudit.target import load_target

    config = config or SearchConfig()
    out = check_writable(out, "--out")
    check_writable(latent_cache_root(cache_dir), "--cache-dir")
    target = load_target(base, device=config.device, dtype="float32", loras=config.loras)
    dataset, source = dataset_for_target(train, target, convert_channels)
    if len(dataset) < 4:
        raise ConfigError(f"the training set {source} has {len(dataset)} images; the search needs at least 4.")
    splits = dataset.split(seed=config.seed, val=config.val_fraction, test=0.0)
    rest, val = splits["train"], splits["val"]
    n_proxy = max(1, round(config.proxy_fraction * len(rest)))
    proxy = rest.subset(torch.randperm(len(rest), generator=torch.Generator().manual_seed(config.seed))[:n_proxy].sort().values)
    # lists the method's units (built on the denoiser and taken out again); nothing is written yet
    evaluator = MaskEvaluator(target, proxy, val, config, progress, cache_dir=cache_dir)
    if not evaluator.units:
        raise ConfigError(f"--method {config.method} has nothing to train on {base} (its "
                          f"{type(target.denoiser).__name__} has no {config.method} parameters), so there is no mask "
                          "to search; choose another --method.")
    check_population(config.population, len(evaluator.units), config.lr_choices,
                     f"{config.method} at {config.granularity} granularity")
    settings = {"kind": "memaudit.search", "schema_version": 1, "base": str(base), "train": source,
                "settings": config.to_dict(), "proxy": list(proxy.names), "validation": list(val.names)}
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples become lists)
    settings_file = out / SETTINGS_FILE
    if settings_file.is_file():
        earlier = json.loads(settings_file.read_text())
        for key, default in (("schedule", "plain"), ("screen_steps", None), ("promote", None)):  # older logs
            earlier.get("settings", {}).setdefault(key, default)
        if {k: earlier.get(k) for k in settings} != settings:
            raise ConfigError(f"{out} holds a search with other settings, base or data; run the same command to resume "
                              "it, or choose another --out.")
    else:
        out.mkdir(parents=True, exist_ok=True)
        from memaudit.audit import versions

        atomic_write_json(settings_file, {**settings, "versions": versions()})
    screen = config.schedule == "screen"
    steps = config.screen_steps if screen else config.inner_steps
    result = nsga2_search(len(evaluator.units), lambda mask, lr: evaluator(mask, lr, steps=steps), out / LOG_FILE,
                          objectives=OBJECTIVES, lr_choices=config.lr_choices, population=config.population,
                          generations=config.generations, seed=config.seed,
                          max_trainable_percent=config.max_trainable_percent, preference=config.preference,
                          progress=progress)
    rows, front, chosen, evaluated = result.rows, result.front, result.chosen, result.evaluated
    if screen:
        rows, evaluated_full = _promote(evaluator, result.front, out, config, progress)
        evaluated += evaluated_full
        front = pareto_front(rows, OBJECTIVES, config.max_trainable_percent)
        chosen = choose(front, OBJECTIVES, config.preference)
    # references: the method's default (every unit, its default learning rate) and full fine-tuning
    references, references_now = _references(evaluator, out, config)
    mask_doc = {"kind": "memaudit.mask", "schema_version": 1, "method": config.method,
                "granularity": config.granularity, "units": [u.name for u in evaluator.units],
                "unit_parameters": [u.count for u in evaluator.units], "base": str(base), "seed": config.seed,
                "inner_steps": config.inner_steps, "schedule": config.schedule,
                "pick": "knee point" if config.preference is None
                else f"weighted sum {list(config.preference)}"}
    if chosen is not None:
        mask_doc.update({"mask": chosen["mask"], "learning_rate": chosen["learning_rate"],
                         "objectives": chosen["objectives"], "trainable_parameters": chosen["trainable_parameters"],
                         "trainable_percent": chosen["trainable_percent"]})
        atomic_write_json(out / "mask.json", mask_doc)
    all_rows = result.rows + (rows if screen else [])
    fine_tunes = {"total": len(all_rows) + len(references), "mask_evaluations": len(all_rows),
                  "references": list(references), "run_now": evaluated + references_now,
                  "without_training": sum(1 for r in all_rows if row_inner_steps(r, config.inner_steps) == 0)}
    if screen:
        fine_tunes.update(screening=len(result.rows), promoted=len(rows))
    front_doc = {"objectives": list(OBJECTIVES), "front": front, "chosen": chosen, "references": references,
                 "evaluations": len(all_rows), "evaluated_now": evaluated, "history": result.history,
                 "fine_tunes": fine_tunes, "verdict": reference_verdict(front, references),
                 "memorization": config.memorization, "quality": config.quality, "schedule": config.schedule,
                 "inner_steps_total": sum(row_inner_steps(r, config.inner_steps) for r in all_rows),
                 "latent_cache": evaluator.cache_report}
    if screen:
        front_doc["screening"] = {"evaluations": len(result.rows), "steps": config.screen_steps,
                                  "promoted": len(rows), "promote": config.promote,
                                  "front": result.front}
    atomic_write_json(out / "pareto.json", front_doc)
    atomic_write_bytes(out / "pareto.png", pareto_png(rows, front, chosen, references, config))
    return front_doc


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


def _promote(evaluator: MaskEvaluator, screening_front: Sequence[dict], out: Path, config: SearchConfig,
             progress: Progress | None) -> tuple[list[dict], int]:
    """The screen schedule's second stage: the masks of the screening front (at most ``config.promote`` of them,
    in :func:`spread_order`) fine-tuned for the full inner steps and scored again (cached and resumable in
    ``promoted.jsonl``). Returns those rows and how many ran now."""
    screening_front = spread_order(screening_front)[:config.promote]
    log, ran = EvaluationLog(out / PROMOTED_FILE), 0
    for k, row in enumerate(screening_front):
        if log.get(row["key"]) is None:
            t0 = time.perf_counter()
            res = evaluator(row["mask"], row["learning_rate"])
            log.append({**res, "key": row["key"], "mask": row["mask"], "learning_rate": row["learning_rate"],
                        "seed": config.seed, "index": len(log), "screen_index": row["index"],
                        "screen_objectives": row["objectives"], "wall_time_s": time.perf_counter() - t0})
            ran += 1
        if progress is not None:
            progress("promotion", k + 1, len(screening_front))
    keys = {r["key"] for r in screening_front}
    return [r for r in log.rows if r["key"] in keys], ran


def _references(evaluator: MaskEvaluator, out: Path, config: SearchConfig) -> tuple[dict, int]:
    """The method's default (every unit at its default learning rate) and full fine-tuning, scored the same way as
    the search's evaluations (cached in ``references.jsonl``), and how many of them were fine-tuned now."""
    from memaudit.mitigate.methods import method_class

    log = EvaluationLog(out / "references.jsonl")
    refs, ran = {}, 0
    for name, method in (("method default", config.method), ("full fine-tuning", "full")):
        lr = method_class(method).default_lr
        key = f"{method}:all-units@{lr:.6g}"
        row = log.get(key)
        if row is None:
            t0 = time.perf_counter()
            res = evaluator(None, lr, method=method)
            row = {**res, "key": key, "method": method, "learning_rate": lr, "wall_time_s": time.perf_counter() - t0}
            log.append(row)
            ran += 1
        refs[name] = row
    return refs, ran


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
