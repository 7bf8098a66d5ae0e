"""One source per setting: every CLI option that sets a config field has that field's default and help text, and
the method and feature lists in help texts are the registries'.

The config dataclasses (``AuditConfig``, ``FinetuneConfig``/``TrainConfig``, ``SearchConfig``) carry each setting's
name, default and help in their field metadata; the CLI declares the same options for typer. This test reads both
and fails naming the option when they disagree, so a default changed in one place cannot drift from the other.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import typer.main

from memaudit.audit import AuditConfig
from memaudit.cli import app
from memaudit.features import available as available_extractors
from memaudit.finetune import FinetuneConfig
from memaudit.mitigate.search import SearchConfig
from memaudit.peft import available_methods

COMMAND = typer.main.get_command(app)

#: (command path, config classes whose fields its options set, options that are the command's own, not a field's)
COMMANDS = [
    (("audit",), (AuditConfig,), {"model", "train", "prompts", "reference_prompts", "heldout", "feature_option",
                                  "convert_channels", "lora", "lora_scale", "out", "threads"}),
    (("finetune",), (FinetuneConfig,), {"base", "train", "out", "lr", "convert_channels", "overwrite", "device",
                                        "cache_dir", "lora", "lora_scale", "threads"}),
    (("mitigate", "search"), (SearchConfig,), {"base", "train", "objectives", "convert_channels", "out", "cache_dir",
                                               "lora", "lora_scale", "threads"}),
]


def command(path: tuple[str, ...]):
    cmd = COMMAND
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def same_default(cli, field) -> bool:
    if isinstance(field, tuple) and isinstance(cli, str):  # a comma-separated list on the command line
        return tuple(float(x) for x in cli.split(",")) == field
    if isinstance(field, (list, tuple)):
        return list(field) == list(cli or [])
    return cli == field


@pytest.mark.parametrize("path,configs,own", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) and
                         isinstance(v[0], str) else None)
def test_cli_options_have_their_config_fields_default_and_help(path, configs, own):
    fields = {f.name: f for cfg in configs for f in dataclasses.fields(cfg)}
    wrong = []
    for param in command(path).params:
        if param.name in own:
            continue
        assert param.name in fields, f"memaudit {' '.join(path)} --{param.name.replace('_', '-')} sets no field of " \
                                     f"{', '.join(c.__name__ for c in configs)}: add the field or list it as the command's own"
        f = fields[param.name]
        if not same_default(param.default, field_default(f)):
            wrong.append(f"--{param.name}: default {param.default!r} on the command line, {field_default(f)!r} in "
                         f"the config")
        if param.help != f.metadata.get("help"):
            wrong.append(f"--{param.name}: help {param.help!r} on the command line, {f.metadata.get('help')!r} in "
                         "the config")
    assert not wrong, f"memaudit {' '.join(path)}:\n" + "\n".join(wrong)


def listed(text: str) -> set[str]:
    return set(re.findall(r"[a-z_0-9]+", text.split(":", 1)[1]))


def test_method_lists_in_help_are_the_registrys():
    methods = set(available_methods())
    for path in (("finetune",), ("mitigate", "search"), ("mitigate", "units")):
        help_text = next(p.help for p in command(path).params if p.name == "method")
        assert listed(help_text) == methods, f"memaudit {' '.join(path)} --method lists {sorted(listed(help_text))}"


def test_feature_lists_in_help_are_the_registrys():
    help_text = next(p.help for p in command(("audit",)).params if p.name == "features")
    # every built-in extractor; "demo" is the bundled demo's plugin (an entry point), for its own small model only
    assert listed(help_text) == set(available_extractors()) - {"demo"}


def test_the_check_catches_a_drifted_default(monkeypatch):
    """Not vacuous: a default changed in the config alone is caught."""
    f = {f.name: f for f in dataclasses.fields(AuditConfig)}["generations"]
    param = next(p for p in command(("audit",)).params if p.name == "generations")
    assert same_default(param.default, field_default(f))
    assert not same_default(param.default + 1, field_default(f))
