"""Outputs never replace what memaudit did not write, and never write over or into an input (issue 20, item 1).

Every refusal is checked the same way: the command raises a one-line error before any work, and every input folder
and the refused output folder hold, byte for byte, what they held before.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from memaudit.core.errors import ConfigError, DataError, MemauditError
from memaudit.core.outputs import MARKER, check_output

FAST = dict(generations=2, steps=2, batch_size=4, min_clique=2, device="cpu")


def tree_hash(path: Path) -> str:
    """SHA-256 over every file below ``path`` (names and bytes), or of the file."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        h.update(str(f.relative_to(path) if Path(path).is_dir() else f.name).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def copies(tmp_path, tiny_dir_eps, data_dir):
    """Private copies of the tiny model and training folder (tests may try to write over them)."""
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_dir_eps, model)
    shutil.copytree(data_dir, data)
    return model, data


def _audit(model, data, out, **kw):
    from memaudit.audit import AuditConfig, run_audit

    heldout = kw.pop("heldout", None)
    return run_audit(str(model), data, out, config=AuditConfig(**{**FAST, **kw}), heldout=heldout)


def _refused(fn, match: str, *paths: Path):
    before = {p: tree_hash(p) for p in paths if p.exists()}
    with pytest.raises(MemauditError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    assert {p: tree_hash(p) for p in paths if p.exists()} == before
    return e.value


@pytest.mark.parametrize("which", ["data", "model", "data_child", "model_parent"])
def test_audit_out_that_is_or_holds_or_lies_in_an_input_is_refused(copies, which, tmp_path):
    model, data = copies
    out = {"data": data, "model": model, "data_child": data / "audit", "model_parent": tmp_path}[which]
    relation = {"data": "is --train", "model": "is the model", "data_child": "lies inside --train",
                "model_parent": "contains"}[which]
    _refused(lambda: _audit(model, data, out), relation, model, data)
    assert not (data / "audit").exists()


def test_audit_out_that_is_the_cache_or_a_prompts_file_is_refused(copies, tmp_path):
    model, data = copies
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "keep.txt").write_text("mine")
    _refused(lambda: _audit(model, data, cache, cache_dir=str(cache)), "is --cache-dir", cache)
    prompts = tmp_path / "p" / "prompts.txt"
    prompts.parent.mkdir()
    prompts.write_text("a photo of item 0\n")
    from memaudit.audit import AuditConfig, run_audit

    _refused(lambda: run_audit(str(model), data, prompts.parent, prompts=prompts, config=AuditConfig(**FAST)),
             "contains --prompts", prompts.parent)


def test_a_captions_file_naming_images_elsewhere_protects_their_folder(copies, tmp_path):
    model, data = copies
    csv = tmp_path / "captions.csv"
    rows = (data / "captions.csv").read_text().splitlines()
    header, body = rows[0], rows[1:]
    csv.write_text("\n".join([header] + [r.replace(r.split(",")[0], str(data / r.split(",")[0]), 1)
                                          for r in body]) + "\n")
    _refused(lambda: _audit(model, csv, data / "sub"), "lies inside the training images", data)


def test_a_folder_memaudit_did_not_write_is_never_replaced(copies, tmp_path):
    model, data = copies
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    _refused(lambda: _audit(model, data, foreign), "memaudit did not write", foreign)


def test_current_folder_is_refused(copies, tmp_path, monkeypatch):
    model, data = copies
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    _refused(lambda: _audit(model, data, "."), "current folder", here)
    _refused(lambda: _audit(model, data, ".."), "current folder", here)


def test_own_output_is_replaced_but_not_with_a_users_file_in_it(copies, tmp_path):
    model, data = copies
    out = tmp_path / "audit"
    before = tree_hash(model), tree_hash(data)
    _audit(model, data, out)
    assert (tree_hash(model), tree_hash(data)) == before
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "audit" and "results.json" in marker["files"] and "report.html" in marker["files"]
    _audit(model, data, out)  # its own output: replaced
    (out / "notes.txt").write_text("my notes")
    _refused(lambda: _audit(model, data, out), "notes.txt", out)
    # another command's output is not the audit's to replace
    with pytest.raises(ConfigError, match="memaudit audit"):
        check_output(out, "finetune")


def test_legacy_outputs_are_recognized_by_their_record(tmp_path):
    old = tmp_path / "old-audit"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"kind": "memaudit.audit"}))
    assert check_output(old, "audit") == old
    with pytest.raises(ConfigError, match="did not write"):
        check_output(old, "finetune")


def test_a_foreign_partial_folder_is_refused(copies, tmp_path):
    model, data = copies
    partial = tmp_path / "audit.partial"
    partial.mkdir()
    (partial / "photos.zip").write_bytes(b"precious")
    _refused(lambda: _audit(model, data, tmp_path / "audit"), "not an unfinished memaudit run", partial)
    assert not (tmp_path / "audit").exists()


def test_finetune_overwrite_never_deletes_inputs_or_foreign_folders(copies, tmp_path):
    from memaudit.finetune import FinetuneConfig, finetune

    model, data = copies
    cfg = FinetuneConfig(steps=1, batch_size=2)
    for out, match in ((model, "is the base model"), (data, "is --train"), (data / "sub", "lies inside --train")):
        _refused(lambda out=out: finetune(str(model), data, out, cfg, device="cpu", overwrite=True), match,
                 model, data)
    foreign = tmp_path / "elsewhere"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    _refused(lambda: finetune(str(model), data, foreign, cfg, device="cpu", overwrite=True), "did not write",
             foreign)
    out = tmp_path / "ft"
    finetune(str(model), data, out, cfg, device="cpu")
    with pytest.raises(ConfigError, match="--overwrite"):
        finetune(str(model), data, out, cfg, device="cpu")
    finetune(str(model), data, out, cfg, device="cpu", overwrite=True)  # its own finished fine-tune: replaced
    assert json.loads((out / MARKER).read_text())["command"] == "finetune"


def test_report_never_replaces_its_results_or_other_files(copies, tmp_path):
    from memaudit.report import write_report

    model, data = copies
    out = tmp_path / "audit"
    _audit(model, data, out)
    _refused(lambda: write_report(out / "results.json", out=out / "results.json"), "results file", out)
    (tmp_path / "letter.html").write_text("<p>dear</p>")
    _refused(lambda: write_report(out / "results.json", out=tmp_path / "letter.html"), "not a report",
             tmp_path / "letter.html")
    again = write_report(out / "results.json")  # its own report.html: replaced
    assert again == out / "report.html"
    with pytest.raises(DataError, match="inside the audit folder"):
        write_report(out / "results.json", redact=True, out=out / "copy")


def test_search_and_export_refuse_inputs_and_foreign_folders(copies, tmp_path):
    from memaudit.mitigate.search import SearchConfig, run_mask_search
    from memaudit.peft import export_merged

    model, data = copies
    _refused(lambda: run_mask_search(str(model), data, data, SearchConfig()), "is --train", data, model)
    _refused(lambda: export_merged(tmp_path / "adapter", model, model), "is the base model", model)


def test_cli_refusals_are_one_line(copies, tmp_path):
    from typer.testing import CliRunner

    from memaudit.cli import app

    model, data = copies
    before = tree_hash(data)
    res = CliRunner().invoke(app, ["audit", str(model), "--train", str(data), "--out", str(data)])
    assert res.exit_code != 0 and "is --train" in str(res.exception)
    assert tree_hash(data) == before


def test_a_cache_folder_inside_an_input_is_refused(copies, tmp_path):
    from memaudit.finetune import FinetuneConfig, finetune

    model, data = copies
    _refused(lambda: _audit(model, data, tmp_path / "a", cache_dir=str(data / "cache")),
             "--cache-dir .* lies inside --train", data, model)
    _refused(lambda: finetune(str(model), data, tmp_path / "f", FinetuneConfig(steps=1), device="cpu",
                              cache_dir=model), "--cache-dir .* is the base model", data, model)
    assert not (data / "cache").exists() and not (tmp_path / "a").exists()
