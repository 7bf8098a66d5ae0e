"""Tests for memaudit.report: the results.json schema and the self-contained HTML report."""

from __future__ import annotations

import base64
import copy
import json
import re

import numpy as np
import pytest
from PIL import Image

from memaudit import report
from memaudit.errors import DataError
from memaudit.report import (
    REDACTED_BANNER,
    SCHEMA_VERSION,
    histogram_png,
    load_results,
    render_html,
    roc_png,
    write_report,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL_PROMPT = 'a <script>alert("x")</script> & "friends"'


def _png(path, color, size=(8, 8)):
    """A small PNG with distinctive content: a solid colour plus one differently coloured pixel."""
    img = Image.new("RGB", size, color)
    img.putpixel((1, 2), (color[2], color[0], color[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path.read_bytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _results():
    prompts = [
        {"index": 0, "prompt": EVIL_PROMPT, "own_train_index": 0, "clique_size": 4, "flagged": True,
         "medoid_generation": 1, "nearest_train_index": 0, "nearest_train_name": "img_000.png",
         "nearest_train_distance": 0.0421, "extracted": True, "denoising_score": 3.217, "amd_mean": 0.05,
         "grid": "grids/p0000.png", "train_image": "train/t0000.png"},
        {"index": 1, "prompt": "a photo of a cat", "own_train_index": 1, "clique_size": 3, "flagged": True,
         "medoid_generation": 0, "nearest_train_index": 5, "nearest_train_name": "img_005.png",
         "nearest_train_distance": 0.3125, "extracted": False, "denoising_score": 2.5, "amd_mean": 0.31,
         "grid": "grids/p0001.png", "train_image": "train/t0005.png"},
        {"index": 2, "prompt": "a photo of a dog", "own_train_index": 2, "clique_size": 1, "flagged": False,
         "medoid_generation": None, "nearest_train_index": None, "nearest_train_name": None,
         "nearest_train_distance": None, "extracted": False, "denoising_score": 0.75, "amd_mean": None,
         "grid": "grids/p0002.png", "train_image": None},
    ]
    images = [
        {"prompt_index": i // 2, "generation": i % 2, "seed": 1000 + i, "min_cosine_distance": d,
         "nearest_train_index": 0, "denoising_norm": 1.0 + i}
        for i, d in enumerate([0.04, 0.05, 0.3, 0.35, 0.6, None])
    ]
    return {
        "kind": "memaudit.audit", "schema_version": 1, "created_utc": "2026-11-22T18:00:00Z",
        "model": "runwayml/sd-finetuned-faces", "train": "data/faces", "prompts_source": "captions",
        "machine": "cpu test box",
        "settings": {"generations": 2, "steps": 20, "guidance": 7.5, "nested": {"a": [1, 2]}},
        "seeds": {"seed": 0, "image_seed": "seed * 1000003 + prompt_index * 101 + generation"},
        "versions": {"memaudit": "0.1.0", "torch": "2.4.1"},
        "redacted": False,
        "summary": {
            "n_prompts": 3, "n_images": 6, "generations_per_prompt": 2,
            "flagged_prompts": 2, "extracted_prompts": 1, "extracted_training_images": 1,
            "edge_threshold": 0.15, "min_clique": 3, "delta": 0.1,
            "feature_extractor": "dinov2-vits14", "amd": 0.2681,
            "denoising_mean": 2.156, "denoising_threshold": 2.875, "denoising_threshold_fpr": 0.05,
            "denoising_flagged": 1,
            "detection": {"auc": 0.9375, "tpr_at_1pct": 0.4219, "tpr_at_01pct": 0.1563, "n_pos": 17, "n_neg": 23,
                          "fpr": [0.0, 0.0005, 0.01, 0.2, 1.0], "tpr": [0.0, 0.1563, 0.4219, 0.9, 1.0],
                          "label_source": "own caption"},
            "wall_time_s": 12.34, "sampling_time_s": 9.876,
        },
        "prompts": prompts,
        "images": images,
    }


@pytest.fixture
def fast_plots(monkeypatch):
    """Stand-ins for the matplotlib plots (slow on a shared CPU) in tests about the rest of the page."""
    calls = []

    def fake(name):
        def plot(*args, **kwargs):
            calls.append((name, args, kwargs))
            return PNG_SIGNATURE + name.encode()

        return plot

    monkeypatch.setattr(report, "histogram_png", fake("hist"))
    monkeypatch.setattr(report, "roc_png", fake("roc"))
    return calls


@pytest.fixture
def audit(tmp_path):
    """An audit folder: results.json, grid PNGs (red, green, blue) and two training PNGs (distinct colours)."""
    folder = tmp_path / "audit"
    grids = [_png(folder / f"grids/p000{i}.png", c, (16, 8)) for i, c in enumerate([(200, 10, 10), (10, 200, 10),
                                                                                     (10, 10, 200)])]
    train = [_png(folder / "train/t0000.png", (123, 45, 67)), _png(folder / "train/t0005.png", (7, 77, 177))]
    results = _results()
    write_results(folder, results)
    return folder, results, grids, train


def _leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# ---------------------------------------------------------------------------------------------- results.json


def test_write_load_round_trip(audit):
    folder, results, _, _ = audit
    path = folder / "results.json"
    assert path.is_file()
    assert load_results(path) == results
    assert load_results(folder) == results  # the folder works too
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION == 1
    assert _leftovers(folder) == []


def test_write_results_fills_kind_and_cleans_values(tmp_path):
    results = _results()
    del results["kind"], results["schema_version"]
    results["summary"]["amd"] = float("nan")
    results["summary"]["n_images"] = np.int64(6)
    results["summary"]["wall_time_s"] = np.float32(1.5)
    results["settings"]["size"] = (64, 64)
    results["settings"]["out"] = tmp_path
    path = write_results(tmp_path, results)
    text = path.read_text()
    assert "NaN" not in text  # strict JSON
    loaded = load_results(path)
    assert loaded["kind"] == "memaudit.audit" and loaded["schema_version"] == 1
    assert loaded["summary"]["amd"] is None
    assert loaded["summary"]["n_images"] == 6 and isinstance(loaded["summary"]["n_images"], int)
    assert loaded["summary"]["wall_time_s"] == 1.5
    assert loaded["settings"]["size"] == [64, 64]
    assert loaded["settings"]["out"] == str(tmp_path)


def test_write_results_validates(tmp_path):
    bad = _results()
    del bad["prompts"]
    with pytest.raises(DataError, match='"prompts"'):
        write_results(tmp_path, bad)
    bad = _results()
    del bad["summary"]["n_images"]
    with pytest.raises(DataError, match="summary.n_images"):
        write_results(tmp_path, bad)
    bad = _results()
    bad["redacted"] = True  # redacted results must not reference training images
    with pytest.raises(DataError, match=r"prompts\[0\].train_image"):
        write_results(tmp_path, bad)
    assert not (tmp_path / "results.json").exists()


def _one_line_error(path, *needles):
    with pytest.raises(DataError) as info:
        load_results(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_load_results_errors(tmp_path):
    _one_line_error(tmp_path / "nope.json", "not found", "nope.json")
    _one_line_error(tmp_path, "not found", "results.json")  # a folder without results.json

    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "memaudit.audit",\n  "schema_version": 1,,}')
    _one_line_error(bad, "not valid JSON", "line 2")

    def dump(name, obj):
        path = tmp_path / name
        path.write_text(json.dumps(obj))
        return path

    _one_line_error(dump("list.json", [1, 2]), "JSON object")
    wrong_kind = dict(_results(), kind="something.else")
    _one_line_error(dump("kind.json", wrong_kind), "kind", "something.else")
    future = dict(_results(), schema_version=SCHEMA_VERSION + 1)
    _one_line_error(dump("future.json", future), "schema_version 2", "newer", "upgrade")
    no_summary = _results()
    del no_summary["summary"]
    _one_line_error(dump("nosummary.json", no_summary), 'missing required key "summary"')
    # the first missing key (in schema order) is the one named
    two_missing = _results()
    del two_missing["images"], two_missing["model"]
    _one_line_error(dump("two.json", two_missing), '"model"')
    bad_prompt = _results()
    del bad_prompt["prompts"][1]["prompt"]
    _one_line_error(dump("prompt.json", bad_prompt), "prompts[1].prompt")
    wrong_type = dict(_results(), prompts={"0": {}})
    _one_line_error(dump("type.json", wrong_type), '"prompts" must be a list')


# ---------------------------------------------------------------------------------------------- HTML


def test_render_html_content(audit):
    folder, results, grids, train = audit
    page = render_html(results, folder)
    assert page.startswith("<!DOCTYPE html>")
    assert "memaudit audit report" in page
    # header
    for text in ("runwayml/sd-finetuned-faces", "data/faces", "2026-11-22T18:00:00Z", "torch 2.4.1",
                 "seed * 1000003 + prompt_index * 101 + generation", "guidance", "7.5"):
        assert text in page, text
    # summary numbers (3-4 significant digits)
    for text in ("0.2681", "dinov2-vits14", "2.156", "2.875", "0.05", "0.9375", "0.4219", "0.1563",
                 "12.34 s", "9.876 s", "own caption", "17 positives"):
        assert text in page, text
    assert re.search(r"Flagged prompts</th><td class=\"n\">2<", page)
    assert re.search(r"Extracted prompts</th><td class=\"n\">1<", page)
    assert re.search(r"Prompts above the threshold</th><td class=\"n\">1<", page)
    # escaping: no raw script tag anywhere, the escaped prompt is present
    assert "<script" not in page.lower()
    assert "a &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;friends&quot;" in page
    # images: flagged grids and both training images embedded; the unflagged prompt's grid is not
    assert _b64(grids[0]) in page and _b64(grids[1]) in page
    assert _b64(grids[2]) not in page
    assert _b64(train[0]) in page and _b64(train[1]) in page
    assert REDACTED_BANNER not in page
    # flagged prompts sorted by distance: prompt 0 (0.0421) before prompt 1 (0.3125)
    assert page.index(_b64(grids[0])) < page.index(_b64(grids[1]))
    # histograms and ROC are embedded as PNG data URIs (2 grids + 2 train + 2 histograms + 1 ROC)
    assert page.count("data:image/png;base64,") == 7
    assert "Detection ROC" in page
    # self-contained: no external references, no JavaScript
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http://" not in page and "https://" not in page


@pytest.mark.parametrize("how", ["argument", "results"])
def test_render_html_redacted(audit, fast_plots, how):
    folder, results, grids, train = audit
    if how == "argument":
        page = render_html(results, folder, redact=True)
    else:
        page = render_html(dict(results, redacted=True), folder)  # paths and files still there
    assert REDACTED_BANNER in page
    for data in train:
        assert _b64(data) not in page
    assert "t0000.png" not in page and "t0005.png" not in page  # not even the paths
    assert _b64(grids[0]) in page  # generations are still shown
    assert "nearest training image #0 (img_000.png), distance 0.0421" in page
    assert "#5 (img_005.png), distance 0.3125" in page


def test_redaction_withholds_a_grid_that_is_a_training_image(audit, fast_plots):
    folder, results, grids, train = audit
    results = copy.deepcopy(results)
    results["prompts"][0]["grid"] = "train/t0000.png"  # the same file
    (folder / "grids/copy.png").write_bytes(train[1])
    results["prompts"][1]["grid"] = "grids/copy.png"  # a byte-identical copy
    page = render_html(results, folder, redact=True)
    assert _b64(train[0]) not in page and _b64(train[1]) not in page
    assert page.count("withheld by redaction") == 2
    assert "train/t0000.png is a training image" in page  # caught by path
    assert "grids/copy.png is identical to a training image" in page  # caught by content
    # without redaction the same results embed them
    page = render_html(results, folder)
    assert _b64(train[0]) in page and _b64(train[1]) in page


def test_missing_and_unsafe_image_paths(audit, fast_plots, tmp_path):
    folder, results, grids, train = audit
    results = copy.deepcopy(results)
    (folder / "grids/p0000.png").unlink()
    outside = _png(tmp_path / "secret.png", (1, 2, 3))
    results["prompts"][1]["grid"] = "../secret.png"
    results["prompts"][1]["train_image"] = str(tmp_path / "secret.png")  # absolute
    (folder / "grids/not_png.png").write_text("hello")
    results["prompts"][0]["train_image"] = "grids/not_png.png"
    page = render_html(results, folder)
    assert "(image file missing: grids/p0000.png)" in page
    assert "(image path outside the results folder: ../secret.png)" in page
    assert "(not a PNG image: grids/not_png.png)" in page
    assert _b64(outside) not in page


def test_caps_on_flagged_prompts_and_table(audit, fast_plots):
    folder, results, _, _ = audit
    page = render_html(results, folder, max_prompts=1, max_table_rows=2)
    assert "1 more flagged prompt(s) not shown" in page
    assert "1 more prompt(s) not shown" in page
    assert "a photo of a dog" not in page  # third prompt: neither flagged nor in the 2-row table


def test_flagged_prompts_sorted_by_distance_nulls_last(audit, fast_plots):
    folder, results, grids, _ = audit
    results = copy.deepcopy(results)
    results["prompts"][1]["nearest_train_distance"] = 0.01  # now closer than prompt 0
    results["prompts"][2].update(flagged=True, nearest_train_distance=None)
    results["prompts"].reverse()
    page = render_html(results, folder)
    positions = [page.index(_b64(g)) for g in (grids[1], grids[0], grids[2])]
    assert positions == sorted(positions)
    page = render_html(results, folder, max_prompts=1)
    assert _b64(grids[1]) in page and _b64(grids[0]) not in page
    assert "2 more flagged prompt(s) not shown" in page


def test_render_without_optional_data(audit, fast_plots):
    folder, results, _, _ = audit
    results = copy.deepcopy(results)
    results["summary"]["detection"] = None
    results["summary"]["amd"] = None
    for im in results["images"]:
        im["min_cosine_distance"] = None
    page = render_html(results, folder)
    assert "Detection ROC" not in page
    assert "No per-image distances" in page
    assert page.count("data:image/png;base64,") == 5  # 4 images + the denoising histogram
    assert [(name, kw) for name, _, kw in fast_plots] == [("hist", {"threshold": 2.875})]
    assert fast_plots[0][1][0] == [3.217, 2.5, 0.75]


def test_write_report(audit, fast_plots, monkeypatch):
    folder, _, grids, train = audit
    calls = []
    real = report.atomic_write_text
    monkeypatch.setattr(report, "atomic_write_text", lambda p, t: calls.append(p) or real(p, t))
    path = write_report(folder / "results.json")
    assert path == folder / "report.html" and calls == [path]
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert _b64(train[0]) in text
    assert _leftovers(folder) == []
    # redacted, from the folder, to another place
    out = write_report(folder, out=folder.parent / "shared" / "r.html", redact=True)
    text = out.read_text(encoding="utf-8")
    assert REDACTED_BANNER in text and _b64(train[0]) not in text and _b64(train[1]) not in text
    assert _leftovers(folder.parent) == []
    with pytest.raises(DataError, match="not found"):
        write_report(folder / "missing.json")


# ---------------------------------------------------------------------------------------------- plots


def test_histogram_png():
    data = histogram_png([0.1, 0.2, None, float("nan"), 0.25, 0.5], "t", "x", threshold=0.3)
    assert data.startswith(PNG_SIGNATURE)
    assert histogram_png([], "empty", "x").startswith(PNG_SIGNATURE)


def test_roc_png():
    data = roc_png([0.0, 0.001, 0.01, 0.5, 1.0], [0.0, 0.2, 0.5, 0.9, 1.0], 0.91)
    assert data.startswith(PNG_SIGNATURE)
    assert roc_png([0.0, 1.0], [0.0, 1.0], None).startswith(PNG_SIGNATURE)
    with pytest.raises(DataError, match="fpr has 2 points but tpr has 3"):
        roc_png([0.0, 1.0], [0.0, 0.5, 1.0], None)


def test_report_does_not_import_cli_libraries():
    import subprocess
    import sys

    code = "import sys, memaudit.report; print(any(m in sys.modules for m in ('typer', 'rich', 'torch')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_quality_alignment_mitigation_and_greedy_clique_are_shown(audit, fast_plots):
    folder, results, grids, train = audit
    results["prompts"][1]["clique_exact"] = False
    results["heldout"] = "data/heldout-faces"
    results["summary"]["quality"] = {"kid": 0.01234, "kid_std": 0.005, "fid": 45.67, "n_real": 20, "n_fake": 200,
                                     "feature_extractor": "demo", "recommended": "kid",
                                     "note": "FID is biased at small sample sizes"}
    results["summary"]["alignment"] = {"scorer": "demo", "mean": 0.9512, "n_images": 6, "reference_mean": 0.875}
    results["summary"]["mitigation"] = {"kind": "threshold", "norm_target": 1.5, "norm_target_source": "given",
                                        "first_step_norm_before_mean": 2.25, "first_step_norm_after_mean": 1.25,
                                        "optimizer_steps_mean": 3.5, "images_over_target_after": 1, "images": 6}
    page = render_html(results, folder)
    for text in ("data/heldout-faces", "KID (held-out)", "0.01234", "45.67", "20 held-out images",
                 "FID is biased at small sample sizes", "0.951", "held-out captions 0.875", "threshold",
                 "2.25 → 1.25", "1 of 6 images still over the target", "greedy lower bound"):
        assert text in page, text
    assert page.count("greedy lower bound") == 1
