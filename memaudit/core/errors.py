"""User-facing errors.

Every mistake a user can make (a wrong path, a bad file, an unsupported checkpoint) raises a subclass of
:class:`MemauditError` whose message is one line saying what is wrong and what to do. The CLI prints that line
and exits with a non-zero code; it never shows a traceback for these.
"""

from __future__ import annotations


class MemauditError(Exception):
    """Base class of the errors a user can fix; the message is one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TargetError(MemauditError):
    """The checkpoint cannot be loaded as a Stable-Diffusion-family pipeline."""


class DataError(MemauditError):
    """A dataset, captions file or image is missing or malformed."""


class ConfigError(MemauditError):
    """A setting is out of range or inconsistent."""
