"""The audit's settings (:class:`AuditConfig`) and what follows from them alone: the settings that make an audit's
identity, the reference prompts' seed stream and the steps the denoising score averages over."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

from memaudit.attacks.extraction import ExtractionConfig
from memaudit.core.errors import ConfigError
from memaudit.core.settings import setting, shared
from memaudit.detectors import resolve_names

__all__ = ["MAX_GENERATIONS", "NOT_IN_IDENTITY", "AuditConfig", "Progress", "detector_key", "identity_settings",
           "reference_seed", "score_window"]


Progress = Callable[[str, int, int], None]

#: Generations per prompt the extraction attack's exact clique search takes.
MAX_GENERATIONS = ExtractionConfig.__dataclass_fields__["max_clique_nodes"].default



@dataclass
class AuditConfig:
    """Settings of an audit; each field's ``help`` metadata documents it."""

    generations: int = setting('images per prompt', default=16)
    steps: int = setting('denoising steps', default=25)
    guidance: float = setting("classifier-free guidance scale", default=7.5)
    batch_size: int = setting('images per denoiser batch', default=16)
    seed: int = setting('seed of every random draw', default=0)
    features: str = setting('AMD feature space: pixels, open_clip, torchscript, inception', default="pixels")
    feature_options: dict = setting("options of the feature extractor (e.g. weights=PATH)", default_factory=dict)
    tiles: int = shared(ExtractionConfig, "tiles", "extraction attack: tiles per side for the max-over-tiles L2")
    edge_threshold: float = shared(ExtractionConfig, "edge_threshold", 'tiled L2 under which two generations are joined')
    min_clique: int = shared(ExtractionConfig, "min_clique", 'flag a prompt when its largest clique has this many members')
    delta: float = shared(ExtractionConfig, "delta", 'extracted when the medoid is this close to a training image')
    extraction_size: int = setting("compare generations at most at this side length (bounds memory)", default=64)
    calibrate_edge: bool = setting('set the edge threshold from the reference prompts', default=False)
    edge_quantile: float = setting("quantile of reference within-prompt distances used as edge threshold", default=0.001)
    denoising_window: tuple = setting("steps [start, stop) the denoising score averages over (stop None: all)", default=(0, None))
    denoising_generations: int | None = setting("generations per prompt the denoising score averages over (None: all)", default=None)
    fpr: float = setting('false-positive rate of the calibrated thresholds', default=0.01)
    detectors: list | str | None = setting("memorization detectors read during sampling: NAME,NAME,..., all, or "
                                           "default (the free ones; `memaudit detectors` lists them)", default="default")
    max_grid: int = setting("generations shown per flagged prompt in the report", default=16)
    redact: bool = setting("leave every training-image pixel out of the outputs", default=False)
    cache_dir: str | None = setting('where the training-feature index is cached for later audits; never inside --out', default=None)
    device: str = setting("auto, cpu or cuda", default="auto")
    dtype: str = setting("float32, float16 or bfloat16", default="float32")
    loras: list = setting("LoRA adapters applied to the model before the audit: [[path, scale], ...]",
                        default_factory=list)
    mitigation: str = setting('inference-time mitigation: none, rwa or threshold', default="none")
    rwa_words: int = setting("rwa: random tokens inserted in every prompt", default=2)
    mitigation_target: float | str = setting('threshold: per-image norm target, or auto (median of the reference '
                                           'prompts)', default="auto")
    mitigation_steps: int = setting("threshold: at most this many AdamW steps on the prompt embedding", default=10)
    mitigation_lr: float = setting("threshold: AdamW learning rate of the prompt-embedding optimization", default=0.05)
    quality_features: str | None = setting('KID/FID feature space (default: --features)', default=None)
    quality_feature_options: dict = setting("options of the quality feature extractor", default_factory=dict)
    alignment: str | None = setting('text-image alignment scorer, e.g. demo', default=None)
    kid_subsets: int = setting("KID: random subsets averaged over", default=100)
    workers: int = setting('sample on N Ray workers, one model replica each (a GPU each when there are GPUs); 1 runs in'
                         ' this process, without Ray. Same results either way', default=1)
    ray_address: str | None = setting('Ray cluster for the workers (HOST:PORT, as `ray start --head` prints it); '
                                    'default: a local Ray instance', default=None)

    def __post_init__(self):
        self.denoising_window = tuple(self.denoising_window)
        self.detectors = resolve_names(self.detectors)  # the names, so a journal records exactly which ran
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1 (1 runs the audit in this process).")
        if self.ray_address is not None and self.workers == 1:
            raise ConfigError("--ray-address needs --workers 2 or more: one worker runs in this process, without Ray.")
        checks = [
            (self.generations >= 1, "generations must be at least 1"),
            (self.generations <= MAX_GENERATIONS, f"--generations is at most {MAX_GENERATIONS} (the exact clique "
             "search's limit per prompt; Carlini et al. use 500)"),
            (self.steps >= 1, "steps must be at least 1"),
            (self.batch_size >= 1, "batch size must be at least 1"),
            (self.tiles >= 1, "tiles must be at least 1"),
            (self.edge_threshold > 0, "edge threshold must be positive"),
            (self.min_clique >= 2, "min clique must be at least 2"),
            (self.delta > 0, "delta must be positive"),
            (self.extraction_size >= self.tiles, "extraction size must be at least the number of tiles"),
            (0 < self.fpr < 1, "fpr must be between 0 and 1"),
            (0 <= self.edge_quantile < 1, "edge quantile must be in [0, 1)"),
            (self.denoising_generations is None or self.denoising_generations >= 1,
             "denoising generations must be at least 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"audit setting invalid: {msg}.")
        if self.mitigation not in ("none", "rwa", "threshold"):
            raise ConfigError(f"--mitigation {self.mitigation!r} is not known; use none, rwa or threshold.")
        if isinstance(self.mitigation_target, str) and self.mitigation_target != "auto":
            try:
                self.mitigation_target = float(self.mitigation_target)
            except ValueError:
                raise ConfigError(f"--mitigation-target must be a number or auto (got {self.mitigation_target!r}).") from None
        if not isinstance(self.mitigation_target, str) and not self.mitigation_target > 0:
            raise ConfigError(f"--mitigation-target must be positive (got {self.mitigation_target!r}).")
        if self.mitigation_steps < 0 or not self.mitigation_lr > 0 or self.rwa_words < 0 or self.kid_subsets < 1:
            raise ConfigError("audit setting invalid: mitigation steps and rwa words must be >= 0, mitigation lr > 0, "
                              "kid subsets >= 1.")
        if self.min_clique > self.generations:
            raise ConfigError(f"min clique ({self.min_clique}) is larger than the generations per prompt "
                              f"({self.generations}), so nothing could be flagged; raise --generations or lower --min-clique.")

    def extraction(self, edge_threshold: float | None = None) -> ExtractionConfig:
        """The extraction attack's settings (``edge_threshold``: the calibrated one, when calibrated)."""
        return ExtractionConfig(tiles=self.tiles, min_clique=self.min_clique, delta=self.delta,
                                edge_threshold=self.edge_threshold if edge_threshold is None else edge_threshold)

    def to_dict(self) -> dict:
        return asdict(self)


#: settings that do not change a result: a journal of any of them resumes with any other
NOT_IN_IDENTITY = ("workers", "ray_address", "cache_dir", "device", "loras")


def identity_settings(config: AuditConfig) -> dict:
    """The settings that change a result (not :data:`NOT_IN_IDENTITY`), as they read back from run.json."""
    return {k: v for k, v in json.loads(json.dumps(config.to_dict(), default=str)).items() if k not in NOT_IN_IDENTITY}


def detector_key(name: str) -> str:
    """The journal array holding detector ``name``'s per-image scores."""
    return f"detector.{name}"


def reference_seed(config: AuditConfig) -> int:
    """Reference prompts get their own seed stream, so they never share noise with the audited prompts."""
    return config.seed + 1


def score_window(config: AuditConfig, target) -> tuple[int, int | None]:
    """The steps the denoising score averages over. A model that makes no unconditional prediction (Flux dev)
    pays one extra denoiser call per image at every scored step, so there the default window (all steps) becomes
    the first step only: the score that detects best (RESULTS section 9) at the least cost."""
    window = tuple(config.denoising_window)
    if not target.family.classifier_free_guidance and window == (0, None):
        return (0, 1)
    return window
