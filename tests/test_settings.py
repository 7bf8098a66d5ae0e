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

from memaudit.attacks.extraction import ExtractionConfig
from memaudit.audit import AuditConfig
from memaudit.cli import app
from memaudit.features import available as available_extractors
from memaudit.finetune import FinetuneConfig
from memaudit.mitigate.search import SearchConfig
from memaudit.peft import available_methods
from memaudit.training import TrainConfig

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
    # every built-in extractor; "demo" and "fashion" are the bundled settings' plugins (entry points), for their own
    # small models only
    assert listed(help_text) == set(available_extractors()) - {"demo", "fashion"}


def test_the_check_catches_a_drifted_default(monkeypatch):
    """Not vacuous: a default changed in the config alone is caught."""
    f = {f.name: f for f in dataclasses.fields(AuditConfig)}["generations"]
    param = next(p for p in command(("audit",)).params if p.name == "generations")
    assert same_default(param.default, field_default(f))
    assert not same_default(param.default + 1, field_default(f))


#: (a command's config, a config it passes settings on to): a field of the first with the name of a field of the
#: second is that setting, so it takes the default from where the setting is declared (core.settings.shared)
SHARED = [(AuditConfig, ExtractionConfig), (FinetuneConfig, TrainConfig), (SearchConfig, TrainConfig),
          (SearchConfig, ExtractionConfig)]


@pytest.mark.parametrize("config,source", SHARED, ids=lambda c: c.__name__)
def test_a_setting_passed_on_takes_its_default_from_where_it_is_declared(config, source):
    theirs = {f.name: f for f in dataclasses.fields(source)}
    wrong = []
    for f in dataclasses.fields(config):
        if f.name not in theirs:
            continue
        here = f"{config.__name__}.{f.name}"
        if f.metadata.get("shared_from") != f"{source.__name__}.{f.name}":
            wrong.append(f"{here} re-declares {source.__name__}.{f.name}: declare it with "
                         f"shared({source.__name__}, {f.name!r})")
        elif f.metadata.get("differs") is None and field_default(f) != field_default(theirs[f.name]):
            wrong.append(f"{here}: default {field_default(f)!r}, {source.__name__}'s {field_default(theirs[f.name])!r}")
    assert not wrong, "\n".join(wrong)


def test_shared_settings_pass_on_what_the_user_set():
    """The audit's and the search's extraction settings, and the fine-tune's training settings, are the ones the
    attack and the training loop run with."""
    audit = AuditConfig(tiles=2, edge_threshold=0.2, min_clique=3, delta=0.3, generations=4)
    assert audit.extraction() == ExtractionConfig(tiles=2, edge_threshold=0.2, min_clique=3, delta=0.3)
    assert audit.extraction(edge_threshold=0.05).edge_threshold == 0.05
    assert SearchConfig().extraction().min_clique == 3 and AuditConfig().extraction() == ExtractionConfig()
    train = FinetuneConfig(steps=7, batch_size=3, seed=5, caption_dropout=0.2, checkpoint_every=2,
                           learning_rate=1e-3).train_config()
    assert (train.steps, train.batch_size, train.seed, train.caption_dropout, train.checkpoint_every,
            train.learning_rate, train.keep_checkpoints) == (7, 3, 5, 0.2, 2, 1e-3, 1)


def test_a_redeclared_setting_is_caught():
    """Not vacuous: a field with a shared name declared on its own, or with another default and no reason, fails."""
    from memaudit.core.settings import setting, shared

    @dataclasses.dataclass
    class Copy:
        tiles: int = setting("tiles", default=4)
        delta: float = shared(ExtractionConfig, "delta")

    with pytest.raises(AssertionError, match="re-declares ExtractionConfig.tiles"):
        test_a_setting_passed_on_takes_its_default_from_where_it_is_declared(Copy, ExtractionConfig)
    with pytest.raises(TypeError, match="needs differs"):
        shared(ExtractionConfig, "delta", default=0.3)


def test_demo_setting_list_in_help_is_the_registrys():
    from memaudit.cli.audit import DEMO_SETTINGS
    from memaudit.demo.settings import DEFAULT_SETTING, setting_names

    assert list(DEMO_SETTINGS) == setting_names() and DEMO_SETTINGS[0] == DEFAULT_SETTING
    help_text = next(p.help for p in command(("demo",)).params if p.name == "setting")
    assert all(name in help_text for name in setting_names())
