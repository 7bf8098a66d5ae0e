"""Factories found by name in installed packages' entry points, so a lower module can offer a higher one's factory.

``memaudit.features`` and ``memaudit.metrics.alignment`` keep registries of factories by name. A factory that lives
in a higher layer (the bundled demo's classifier, in :mod:`memaudit.demo`) or in another package is declared as an
entry point instead of being imported::

    [project.entry-points."memaudit.feature_extractors"]
    demo = "memaudit.demo.scorer:feature_factory"

and loaded the first time its name is asked for. Other packages add extractors or scorers the same way.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from importlib import metadata
from typing import Any

from memaudit.core.errors import ConfigError

#: entry point groups
FEATURE_EXTRACTORS = "memaudit.feature_extractors"
ALIGNMENT_SCORERS = "memaudit.alignment_scorers"
DETECTORS = "memaudit.detectors"


def names(group: str) -> list[str]:
    """Names declared in ``group`` by installed packages, sorted."""
    return sorted({ep.name for ep in metadata.entry_points(group=group)})


def load(group: str, name: str) -> Callable[..., Any] | None:
    """The factory declared as ``name`` in ``group``, imported now; None when no installed package declares it."""
    found = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not found:
        return None
    try:
        factory = found[0].load()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{group} entry point {name!r} ({found[0].value}) cannot be loaded ({e}); reinstall the "
                          "package that declares it.") from e
    if not callable(factory):
        raise ConfigError(f"{group} entry point {name!r} ({found[0].value}) is not callable.")
    return factory


def names_beside(registry: MutableMapping[str, Any], group: str) -> list[str]:
    """The registry's names in registration order, then the names ``group`` declares that it does not hold yet."""
    return list(registry) + [n for n in names(group) if n not in registry]


def resolve(registry: MutableMapping[str, Any], group: str, name: str) -> Callable[..., Any] | None:
    """The factory registered as ``name``; else the one ``group`` declares, loaded and kept in ``registry`` now
    (a registry's own ``register`` refuses the names that entry points declare); else None."""
    if name not in registry:
        factory = load(group, name)
        if factory is None:
            return None
        registry[name] = factory
    return registry[name]
