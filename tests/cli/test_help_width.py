"""Every command's ``--help`` is readable at 80 columns: every option name in full, no line wider than 80."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from memaudit.cli import app

WIDTH = 80


def _commands(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """The command and every subcommand below it, by their argument path (typer's click commands: typer 0.29
    vendors click, so groups are recognized by their ``commands``)."""
    found = [(path, command)]
    if getattr(command, "commands", None):
        for name, sub in sorted(command.commands.items()):
            found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _option_tokens(line: str) -> list[str]:
    """The option names a help line starts with (``-v, --verbose``, ``--flag / --no-flag``), table borders and
    the required mark skipped."""
    tokens = [t for t in re.split(r"[\s,/│┃|*]+", line) if t]
    names = []
    for token in tokens:
        if not token.startswith("-"):
            break
        names.append(token)
    return names


def test_every_command_is_listed():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "audit", "report", "info", "finetune", "demo", "mitigate", "mitigate search", "mitigate finetune",
            "mitigate export", "mitigate units"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "memaudit" for p, _ in COMMANDS])
def test_help_fits_80_columns_with_every_option_name(path, command):
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)},
                             terminal_width=WIDTH)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    wide = [line for line in lines if len(line) > WIDTH]
    assert not wide, f"{len(wide)} lines wider than {WIDTH}: {wide[:3]}"
    assert "…" not in res.output
    shown = {name for line in lines for name in _option_tokens(line)}
    declared = {"--help"} | {name for p in command.params if p.param_type_name == "option"
                             for name in (*p.opts, *p.secondary_opts)}
    assert len(declared) > 1 or not command.params
    missing = sorted(declared - shown)
    assert not missing, f"option names not shown in full at {WIDTH} columns: {missing}\n{res.output}"
