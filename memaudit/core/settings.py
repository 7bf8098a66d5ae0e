"""Settings declared once. A config dataclass field carries its help text in its metadata (:func:`setting`); a
field that is another config's setting seen from a wider command takes that setting's default from where it is
declared (:func:`shared`), so a default changed there changes everywhere. A field that must differ says why
(``differs=``), and ``tests/test_settings.py`` fails on a same-named field that neither shares nor says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["default_of", "setting", "shared"]


def setting(help: str, **kw) -> Any:
    """A dataclass field documented by ``help`` (the CLI's help text for the same option)."""
    return dataclasses.field(metadata={"help": help}, **kw)


def default_of(config: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``config`` (its factory's value for a mutable default)."""
    f = {f.name: f for f in dataclasses.fields(config)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"{config.__name__}.{name} has no default")


def shared(source: type, name: str, help: str | None = None, differs: str | None = None, **default) -> Any:
    """A field that is setting ``name`` of the dataclass ``source``: the same default unless ``differs`` says why
    this one differs (then ``default=`` gives it); the help text is ``help``, or the source's.

    The metadata records ``shared_from`` (``"Source.name"``) and ``differs`` for the settings test."""
    f = {f.name: f for f in dataclasses.fields(source)}[name]
    if default and differs is None:
        raise TypeError(f"a default for shared setting {source.__name__}.{name} needs differs= (why it differs)")
    if not default:
        if f.default_factory is not dataclasses.MISSING:
            default = {"default_factory": f.default_factory}
        else:
            default = {"default": f.default}
    meta = {"help": help if help is not None else f.metadata["help"], "shared_from": f"{source.__name__}.{name}",
            "differs": differs}
    return dataclasses.field(metadata=meta, **default)
