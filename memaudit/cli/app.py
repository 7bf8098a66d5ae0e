"""The typer app: its root options (``--version``, ``--verbose``), its commands in the order ``--help`` lists them,
and :func:`main`, the console entry point that turns user errors and Ctrl-C into one line and an exit code.

Heavy modules (torch, diffusers, and the memaudit modules that load them: memaudit.audit, memaudit.finetune,
memaudit.mitigate, memaudit.report ...) are imported inside the command functions, never at a module's top here or in
the modules this one imports: that is a measured import cost, and ``memaudit --help`` and ``--version`` stay instant.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from memaudit import __version__
from memaudit.cli.audit import audit, demo, detectors, info, report
from memaudit.cli.finetune import finetune
from memaudit.cli.mitigate import mitigate_app
from memaudit.cli.progress import interrupt_message
from memaudit.core.errors import MemauditError

__all__ = ["app", "main"]

app = typer.Typer(
    name="memaudit",
    help="Audit fine-tuned diffusion models for memorized training images, and mitigate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help, not rich's tables: rich squeezes long option names to fit 80 columns and cuts them
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"memaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# the commands, in the order `memaudit --help` lists them
app.command()(info)
app.command()(audit)
app.command()(finetune)
app.command()(report)
app.command()(demo)
app.command()(detectors)
app.add_typer(mitigate_app, name="mitigate")


def main() -> None:
    """Console entry point: typer reports usage errors itself (exit 2); memaudit's user errors print one line and
    exit with code 2, never a traceback."""
    try:
        app()
    except MemauditError as e:
        typer.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside a command's own handling (see memaudit.cli.progress.progress_display)
        typer.echo(interrupt_message(sys.argv[1:], None), err=True)
        sys.exit(130)
