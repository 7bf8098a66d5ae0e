"""Entry-point factories (memaudit.core.plugins): the demo's extractor and scorer are found by name, never imported by the
lower layers, and another package's factory is loaded the same way."""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest
import torch

import memaudit
from memaudit import features
from memaudit.core import plugins
from memaudit.core.errors import ConfigError
from memaudit.metrics import alignment

PACKAGE = Path(memaudit.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", [PACKAGE / "features.py", *sorted((PACKAGE / "metrics").glob("*.py"))],
                         ids=lambda p: p.name)
def test_lower_layers_never_import_the_demo(path):
    assert not {m for m in _imported_modules(path) if m == "memaudit.demo" or m.startswith("memaudit.demo.")}


def test_the_demo_is_found_through_its_entry_points():
    assert "demo" in plugins.names(plugins.FEATURE_EXTRACTORS) and "demo" in plugins.names(plugins.ALIGNMENT_SCORERS)
    extractor = features.get_extractor("demo")
    assert extractor.name == "demo"
    assert extractor(torch.zeros(2, 1, 32, 32)).shape == (2, 64)
    scorer = alignment.get_scorer("demo")
    assert scorer.name == "demo"
    assert "demo" in features.available() and "demo" in alignment.available_scorers()
    with pytest.raises(ConfigError, match="has no option"):
        alignment.get_scorer("demo", colour="red")


def double_factory(device="cpu", batch_size=64, **options):
    return features.FeatureExtractor(torch.nn.Flatten(), "plugin-flatten", None, device=device, batch_size=batch_size)


def test_another_package_declares_an_extractor(monkeypatch):
    real = metadata.entry_points

    def entry_points(group=None, **kw):
        found = list(real(group=group, **kw))
        if group == plugins.FEATURE_EXTRACTORS:
            found += [metadata.EntryPoint("plugin-flatten", f"{__name__}:double_factory", group),
                      metadata.EntryPoint("plugin-broken", f"{__name__}:no_such_factory", group)]
        return found

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(features, "_REGISTRY", dict(features._REGISTRY))
    assert {"plugin-flatten", "plugin-broken"} <= set(features.available())
    ex = features.get_extractor("plugin-flatten")
    assert ex.name == "plugin-flatten" and ex(torch.ones(3, 1, 2, 2)).tolist() == [[1.0] * 4] * 3
    with pytest.raises(ConfigError, match="plugin-broken.*cannot be loaded"):
        features.get_extractor("plugin-broken")
    with pytest.raises(ConfigError, match="'nothing' does not exist; choose one of: pixels"):
        features.get_extractor("nothing")
