"""The settings of the mask search (:class:`SearchConfig`, its objectives and schedules) and the identity of a search
that ``search.json`` records, against which a resumed search is checked (:func:`check_resume`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from memaudit.attacks.extraction import ExtractionConfig
from memaudit.core.digests import tree_digest
from memaudit.core.errors import ConfigError
from memaudit.core.runs import differences, listed
from memaudit.core.settings import setting, shared
from memaudit.mitigate.search.nsga2 import size_problem
from memaudit.peft import GRANULARITIES, available_methods
from memaudit.training.config import TrainConfig

__all__ = ["MEMORIZATION", "NOT_IN_IDENTITY", "OBJECTIVES", "OBJECTIVES_USAGE", "QUALITY", "SCHEDULES",
           "SETTINGS_FILE", "SearchConfig", "check_resume", "identity_before_loading", "parse_objectives"]

SETTINGS_FILE = "search.json"
MEMORIZATION = ("denoising", "extraction", "amd")
SCHEDULES = ("plain", "screen")
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



@dataclass
class SearchConfig:
    """Settings of :func:`run_mask_search`; each field's ``help`` metadata documents it."""

    method: str = setting('PEFT method whose units the mask switches: full, freeze, bias, norm, attention, svdiff, '
                        'difffit, lora', default="svdiff")
    granularity: str = setting('block (one unit per transformer block, plus the rest) or layer', default="block")
    population: int = setting("NSGA-II population", default=8)
    generations: int = setting("NSGA-II generations", default=4)
    lr_choices: tuple = setting('comma-separated learning rates the search chooses from', default=(3e-4, 1e-3, 3e-3, 1e-2))
    inner_steps: int = setting('fine-tuning steps per evaluation', default=200)
    batch_size: int = shared(TrainConfig, "batch_size", "images per fine-tuning step")
    proxy_fraction: float = setting('share of the distinct training images (each with all its copies) the inner loop uses',
                                   default=0.5)
    val_fraction: float = setting("share of the distinct training images (each with all its copies) held out for the "
                                 "quality objective", default=0.2)
    memorization: str = setting("memorization objective: denoising (training-time strength on the proxy images), "
                              "extraction (extracted proxy images), amd (negated AMD of proxy generations)",
                              default="denoising")
    quality: str = setting("quality objective on the validation split: kid or fid", default="kid")
    quality_features: str = setting("feature space of the quality objective", default="pixels")
    generations_per_prompt: int = setting("generations per caption when an objective samples", default=4)
    sample_steps: int = setting("denoising steps when an objective samples", default=25)
    guidance: float = setting("guidance scale when an objective samples", default=4.0)
    min_clique: int = shared(ExtractionConfig, "min_clique", "extraction objective: clique size that flags a caption",
                             differs="an objective samples 4 generations per caption, not the audit's 16", default=3)
    max_trainable_percent: float | None = setting('constraint: at most this % of the denoiser trains', default=None)
    preference: tuple | None = setting('weights MEM,QUALITY for the pick (default: knee point)', default=None)
    schedule: str = setting('plain, or screen: search on short fine-tunes (--screen-steps), then train only the '
                          'screening front for --inner-steps', default="plain")
    screen_steps: int | None = setting('screen: steps of a screening fine-tune (default: inner steps / 5)',
                                     default=None)
    promote: int | None = setting('screen: train at most this many screening-front masks for --inner-steps, spread '
                                'along the front (default: all)',
                                default=None)
    seed: int = shared(TrainConfig, "seed", 'seed of every random draw')
    device: str = setting("auto, cpu or cuda", default="auto")
    loras: list = setting("LoRA adapters fused into the base before the search: [[path, scale], ...]", default_factory=list)
    workers: int = setting("run each generation's evaluations on N Ray workers, one model replica each (a GPU each when"
                         ' there are GPUs); 1 runs in this process, without Ray. Same results either way', default=1)
    ray_address: str | None = setting('Ray cluster for the workers (HOST:PORT, as `ray start --head` prints it); '
                                    'default: a local Ray instance', default=None)

    def __post_init__(self):
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

    def extraction(self) -> ExtractionConfig:
        """The extraction objective's settings: the attack's defaults but for the clique size."""
        return ExtractionConfig(min_clique=self.min_clique)

    def to_dict(self) -> dict:
        return asdict(self)


OBJECTIVES = ("memorization", "quality")
#: settings that do not change a result: a search resumes with any other value of them
NOT_IN_IDENTITY = ("workers", "ray_address")


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


def identity_before_loading(base, train, config: SearchConfig) -> dict:
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
