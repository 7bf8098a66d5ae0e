"""Memorization detectors, read from the one sampling pass: one file each, one registry line each.

Built in (``memaudit detectors`` lists them with their cost):

``wen_first``, ``wen_all``
    Wen et al. (ICLR 2024): ``||eps_c - eps_u||`` at the first step / over every step (:mod:`.wen`). Free.
``anisotropy_first``
    Asthana & Belagiannis' score with its alignment read at the first step (:mod:`.anisotropy`). Free.
``memattn``
    Ren et al. (ECCV 2024): the entropy of one cross-attention layer's attention over the text tokens at the first
    step (:mod:`.memattn`). Free; UNet families and PixArt.
``bright_ending``
    Chen et al. (ICLR 2025): Wen's magnitude within the end token's last-step cross-attention map, the memorized
    region (:mod:`.bright_ending`). Free; UNet families and PixArt.
``anisotropy``
    Asthana & Belagiannis (ICLR 2026): first-step magnitude plus the alignment of the guidance direction with the
    unconditional prediction at a low-noise label on ``x_T`` (:mod:`.anisotropy`). 2 extra evaluations per image.
``sharpness``
    Jeon et al. (ICML 2025): the log-density's sharpness at ``x_T`` along the guidance direction, one forward-mode
    product (:mod:`.sharpness`). 2 extra evaluations per image.

Free detectors (no denoiser call beyond the pass) run by default; ``--detectors NAME,...`` or ``all`` chooses.
Another package adds a detector by declaring its :class:`~memaudit.detectors.base.Detector` subclass in the
``memaudit.detectors`` entry-point group::

    [project.entry-points."memaudit.detectors"]
    mine = "mypackage.detectors:MyDetector"
"""

from __future__ import annotations

from memaudit.core import plugins
from memaudit.core.errors import ConfigError
from memaudit.detectors.anisotropy import Anisotropy, AnisotropyFirst
from memaudit.detectors.base import Detector, Probe, StepView
from memaudit.detectors.bright_ending import BrightEnding
from memaudit.detectors.memattn import MemAttn
from memaudit.detectors.sharpness import Sharpness
from memaudit.detectors.wen import WenAll, WenFirst

__all__ = ["Detector", "Probe", "StepView", "available", "default_names", "get_detector", "register",
           "resolve_names"]

_REGISTRY: dict[str, type[Detector]] = {}


def register(cls: type[Detector]) -> type[Detector]:
    """Add a detector class under its :attr:`~Detector.name` (refused when the name is taken, by a registered class
    or an entry point)."""
    if not cls.name or cls.name in _REGISTRY or cls.name in plugins.names(plugins.DETECTORS):
        raise ConfigError(f"detector name {cls.name!r} is empty or taken; give the detector another name.")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (WenFirst, WenAll, AnisotropyFirst, MemAttn, BrightEnding, Anisotropy, Sharpness):
    register(_cls)


def available() -> list[str]:
    """Every detector's name: the built-in ones in registration order, then those installed packages declare."""
    return plugins.names_beside(_REGISTRY, plugins.DETECTORS)


def get_detector(name: str) -> type[Detector]:
    """The detector class called ``name``."""
    cls = plugins.resolve(_REGISTRY, plugins.DETECTORS, name)
    if cls is None:
        raise ConfigError(f"--detectors: no detector called {name!r}; choose from {', '.join(available())} "
                          "(`memaudit detectors` lists them).")
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        raise ConfigError(f"--detectors: {name!r} ({cls!r}) is not a memaudit Detector subclass.")
    return cls


def default_names() -> list[str]:
    """The detectors that run by default: the free ones (no denoiser call beyond the sampling pass)."""
    return [n for n in available() if get_detector(n).free()]


def resolve_names(spec: str | list[str] | None) -> list[str]:
    """The detector names ``--detectors`` asks for: ``None``/``"default"`` the free ones, ``"all"`` every one,
    else a comma-separated list (or a list), each checked, in the order given, without repeats."""
    if spec is None or spec == "default":
        return default_names()
    if spec == "all":
        return available()
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    out = []
    for name in names:
        if not name:
            raise ConfigError(f"--detectors {spec!r}: an empty name; give NAME,NAME,... or all.")
        get_detector(name)
        if name not in out:
            out.append(name)
    return out
