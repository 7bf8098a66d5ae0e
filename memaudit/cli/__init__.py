"""The ``memaudit`` command line. Thin: each command parses options, calls the library, and prints.

Heavy modules (torch, diffusers) are imported inside commands so that ``--help`` and ``--version`` are instant.
User mistakes (:class:`memaudit.core.errors.MemauditError`) print one line and exit with code 2, never a traceback.

- :mod:`memaudit.cli.app`: the typer app, its root options, :func:`main` (the ``memaudit`` entry point)
- :mod:`memaudit.cli.options`: the options commands share and the checks of their values
- :mod:`memaudit.cli.progress`: progress bars and lines, the Ctrl-C message, the audit summary
- :mod:`memaudit.cli.audit`: ``info``, ``audit``, ``report``, ``demo``
- :mod:`memaudit.cli.finetune`: ``finetune``
- :mod:`memaudit.cli.mitigate`: ``mitigate search``, ``finetune``, ``export``, ``units``
"""

from __future__ import annotations

from memaudit.cli.app import app, main
from memaudit.cli.mitigate import mitigate_app
from memaudit.cli.options import use_threads
from memaudit.cli.progress import PlainProgress, interrupt_message, reuse_line

__all__ = ["PlainProgress", "app", "interrupt_message", "main", "mitigate_app", "reuse_line", "use_threads"]
