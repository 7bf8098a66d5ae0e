"""Tests for memaudit.report: the results.json schema and the self-contained HTML report."""

from __future__ import annotations

import base64
import copy
import html
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from memaudit import report
from memaudit.core.errors import DataError, MemauditError
from memaudit.report import (
    REDACTED_BANNER,
    ROUNDTRIP_CAPTION,
    SCHEMA_VERSION,
    detection_note,
    histogram_counts,
    histogram_svg,
    load_results,
    nice_ticks,
    render_html,
    roc_png,
    verdict,
    write_redacted_report,
    write_report,
    write_results,
)
from memaudit.report import html as report_html
from memaudit.report import plots as report_plots
from memaudit.report import write as report_write

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
    """Stand-ins for the plots (matplotlib's ROC is slow on a shared CPU) in tests about the rest of the page."""
    calls = []

    def fake(name, svg=False):
        def plot(*args, **kwargs):
            calls.append((name, args, kwargs))
            return f'<svg class="fake-{name}"></svg>' if svg else PNG_SIGNATURE + name.encode()

        return plot

    monkeypatch.setattr(report_html, "histogram_svg", fake("hist", svg=True))
    monkeypatch.setattr(report_html, "roc_png", fake("roc"))
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
    # the ROC is embedded as a PNG data URI (2 grids + 2 train + 1 ROC), both histograms as inline SVG
    assert page.count("data:image/png;base64,") == 5
    assert page.count('<svg class="histogram"') == 2
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
    assert page.count("data:image/png;base64,") == 4  # 2 grids + 2 train (the histogram is SVG)
    assert page.count('<svg class="fake-hist"') == 1
    assert [(name, kw) for name, _, kw in fast_plots] == [("hist", {"threshold": 2.875})]
    assert fast_plots[0][1][0] == [3.217, 2.5, 0.75]


def test_write_report(audit, fast_plots, monkeypatch):
    folder, _, grids, train = audit
    calls = []
    real = report_write.atomic_write_text
    monkeypatch.setattr(report_write, "atomic_write_text", lambda p, t: calls.append(p) or real(p, t))
    path = write_report(folder / "results.json")
    assert path == folder / "report.html" and calls == [path]
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert _b64(train[0]) in text
    assert _leftovers(folder) == []
    # redacted, from the folder, to another place: a new folder (the audit's own report is left alone)
    before = path.read_bytes()
    out = write_report(folder, out=folder.parent / "shared", redact=True)
    assert out == folder.parent / "shared" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert REDACTED_BANNER in text and _b64(train[0]) not in text and _b64(train[1]) not in text
    assert path.read_bytes() == before
    assert _leftovers(folder.parent) == []
    with pytest.raises(DataError, match="names an HTML file.*pass a folder for --out"):
        write_report(folder, out=folder.parent / "r.html", redact=True)
    assert not (folder.parent / "r.html").exists()
    with pytest.raises(DataError, match="not found"):
        write_report(folder / "missing.json")


# ---------------------------------------------------------------------------------------------- plots


def _bars(svg):
    """(series, count, x, width, height) of each bar of a histogram SVG."""
    return [(int(r.get("data-series")), int(r.get("data-count")), float(r.get("x")), float(r.get("width")),
             float(r.get("height"))) for r in ET.fromstring(svg).iter("rect") if r.get("class") == "bar"]


def test_histogram_svg_draws_the_counts_to_scale():
    values = [0.1, 0.2, None, float("nan"), 0.3, 0.5, "x"]
    svg = histogram_svg(values, "Scores <&>", "x", threshold=0.22)
    root = ET.fromstring(svg)  # well-formed markup
    assert root.tag == "svg" and "<script" not in svg and "http" not in svg
    assert root.find("title").text == "Scores <&> (n=4)"  # escaped in the markup, the finite values counted
    # 4 values: 5 bins over [0.1, 0.5], edges 0.1, 0.18, 0.26, 0.34, 0.42, 0.5: 0.1 | 0.2 | 0.3 | - | 0.5
    bars = _bars(svg)
    assert [(s, c) for s, c, *_ in bars] == [(0, 1), (0, 1), (0, 1), (0, 1)]
    heights = {round(h, 6) for *_, h in bars}
    assert len(heights) == 1  # equal counts, equal heights
    x = sorted(b[2] for b in bars)
    unit = bars[0][3]  # one bin's width in SVG units
    assert x[1] - x[0] == pytest.approx(unit, abs=0.02) and x[3] - x[2] == pytest.approx(2 * unit, abs=0.02)
    # the threshold line sits at 0.22: 1.5 bins right of the first bar's left edge
    line = next(e for e in root.iter("line") if e.get("class") == "threshold")
    assert float(line.get("data-value")) == 0.22
    assert float(line.get("x1")) == pytest.approx(x[0] + 1.5 * unit, abs=0.02)
    assert "threshold 0.22" in svg
    # a count of 2 is twice as tall as a count of 1
    tall = {c: h for _, c, _, _, h in _bars(histogram_svg([1.0, 1.0, 2.0, 3.0, 4.0], "t", "x"))}
    assert tall[2] == pytest.approx(2 * tall[1], abs=0.02)
    empty = histogram_svg([None, float("nan")], "empty", "x", threshold=1.0)
    assert _bars(empty) == [] and "no values" in empty and ET.fromstring(empty).find("title").text == "empty (n=0)"


def test_nice_ticks():
    assert nice_ticks(0, 25) == [0, 5, 10, 15, 20, 25]
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(-0.013, 0.52) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert nice_ticks(3, 3) == [3]


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


# ---------------------------------------------------------------------------------------------- reading order


def _text(page: str) -> str:
    """The page's visible text (tags removed, entities decoded, whitespace collapsed)."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _as(results, case):
    """The fixture's results turned into one of the three verdict cases."""
    results = copy.deepcopy(results)
    s = results["summary"]
    if case in ("flagged", "clean"):
        results["prompts"][0]["extracted"] = False
        s.update(extracted_prompts=0, extracted_training_images=0)
    if case == "clean":
        for p in results["prompts"]:
            p["flagged"] = False
        s.update(flagged_prompts=0)
    return results


VERDICTS = {
    "extracted": "The model reproduces its training images: 1 training image (of 80) extracted: for 1 of 3 prompts, "
                 "a clique of near-identical generations lies within δ = 0.1 of a training image.",
    "flagged": "The model repeats near-identical generations for 2 of 3 prompts, but none matched a training image "
               "within δ = 0.1: no training image was extracted.",
    "clean": "No prompt was flagged at these settings (3 prompts × 2 generations): evidence against reproduction of "
             "training images at this sampling budget, not proof.",
}


@pytest.mark.parametrize("case", ["extracted", "flagged", "clean"])
def test_verdict_comes_first_and_settings_are_folded_at_the_end(audit, fast_plots, case):
    folder, results, _, _ = audit
    results = _as(results, case)
    results["summary"].update(n_train=80, amd=0.0175, reference_amd=0.0912)
    page = render_html(results, folder)
    assert verdict(results) == (case, VERDICTS[case])
    box = f'<div class="verdict {case}">{html.escape(VERDICTS[case], quote=True)}</div>'
    assert page.count('<div class="verdict ') == 1 and box in page
    flagged, images = {"extracted": (2, 1), "flagged": (2, 0), "clean": (0, 0)}[case]
    text = _text(page)
    for number in (f"{flagged} of 3 prompts flagged", f"{images} of 80 training images extracted",
                   "AMD 0.0175 generations for the reference prompts: 0.0912; lower means closer to the training set"):
        assert number in text, number
    # reading order: title, verdict, the three numbers, summary table ... and the settings last, folded
    start, end = page.index("<details"), page.index("</details>")
    assert page.index("<h1>") < page.index(box) < page.index('<div class="headline">') < page.index("<h2>Summary")
    assert page.index("<h2>Summary") < page.index("<h2>All prompts") < start
    assert "<summary>Settings, seeds and versions</summary>" in page[start:end]
    for setting in ("<th>Model</th>", "<th>Machine</th>", "torch 2.4.1", "seed * 1000003", "<th>guidance</th>",
                    "2026-11-22T18:00:00Z"):
        assert start < page.index(setting) < end, setting
        assert page.count(setting) == 1, setting


def test_verdict_without_optional_numbers_and_with_a_mitigation(audit, fast_plots):
    folder, results, _, _ = audit
    text = _text(render_html(results, folder))  # no n_train, no reference_amd
    assert "1 training image extracted" in text and "of 80" not in text
    assert "AMD 0.2681 lower means closer to the training set (no reference prompts to compare with)" in text
    results["summary"]["mitigation"] = {"kind": "rwa", "rwa_words": 2}
    assert verdict(results)[1].startswith("The model reproduces its training images with rwa mitigation on: ")
    assert verdict(_as(results, "flagged"))[1].startswith(
        "The model repeats near-identical generations for 2 of 3 prompts with rwa mitigation on, but")
    assert verdict(_as(results, "clean"))[1].startswith(
        "No prompt was flagged at these settings (3 prompts × 2 generations, with rwa mitigation on): ")


# ---------------------------------------------------------------------------------------------- detection


def test_detection_not_computed_when_every_prompt_is_extracted_without_reference(audit, fast_plots):
    folder, results, _, _ = audit
    results["summary"].update(detection=None, extracted_prompts=3, flagged_prompts=3, denoising_threshold=None)
    results["settings"]["reference_prompts"] = 0
    page = render_html(results, folder)
    expected = ("AUC not computed: every audited prompt (3 of 3) is extracted and there are no reference prompts "
                "known not to be memorized, so all labels are positive; pass --reference-prompts or --heldout.")
    assert detection_note(results) == expected
    assert f'<p class="explain">{expected}</p>' in page
    assert page.index(expected) < page.index("<h2>Flagged prompts")
    assert "No denoising threshold: it is calibrated on reference prompts" in page
    # nothing extracted: no positives
    results["summary"].update(extracted_prompts=0)
    assert detection_note(results) == ("AUC not computed: no audited prompt is extracted, so there is no memorized "
                                       "prompt to detect and there are no reference prompts.")
    results["settings"]["reference_prompts"] = 7
    assert detection_note(results).endswith("; the 7 reference prompts add only negatives.")


def test_detection_with_few_positives_or_audited_negatives_only(audit, fast_plots):
    folder, results, _, _ = audit
    det = results["summary"]["detection"]
    det.update(n_pos=2, n_neg=23)
    note = detection_note(results)
    assert note.startswith("AUC rests on only 2 positives: treat it and the TPRs as indicative. ")
    assert ("With 23 negatives the smallest non-zero FPR is 0.043, so the TPR at 1% and 0.1% FPR is the TPR with no "
            "false positive at all.") in note
    # label source "own caption": the negatives are unflagged audited prompts, not known-clean ones
    assert note.endswith("the negatives are audited prompts the extraction attack did not extract, not prompts "
                         "known to be clean; pass --reference-prompts or --heldout for known-clean negatives.")
    assert html.escape(note, quote=True) in render_html(results, folder)
    det.update(n_pos=1, n_neg=4)
    assert detection_note(results).startswith("AUC rests on only 1 positive and 4 negatives: ")
    # enough of both, with reference prompts as negatives: nothing to warn about
    det.update(n_pos=17, n_neg=2000, label_source="extraction attack verdicts; reference prompts as non-memorized")
    results["settings"]["reference_prompts"] = 1990
    assert detection_note(results) is None
    det.update(n_neg=500)
    assert detection_note(results) == ("With 500 negatives the smallest non-zero FPR is 0.002, so the TPR at 0.1% FPR "
                                       "is the TPR with no false positive at all.")


# ---------------------------------------------------------------------------------------------- reference scores


def test_histogram_counts_share_bins():
    edges, counts = histogram_counts([[0, 1, None, 2, 3, float("nan")], [3, 4]])
    assert edges == pytest.approx([0.0, 0.8, 1.6, 2.4, 3.2, 4.0])  # 6 values: 5 bins over both series' range
    assert counts == [[1, 1, 1, 1, 0], [0, 0, 0, 1, 1]]
    edges, counts = histogram_counts([[2.0, 2.0]])
    assert edges[0] == 1.5 and edges[-1] == 2.5 and counts == [[0, 0, 2, 0, 0]]
    assert histogram_counts([[], [None]]) == ([], [[], []])


def test_reference_scores_are_drawn_beside_the_audited_ones(audit, fast_plots, monkeypatch):
    folder, results, _, _ = audit
    results["reference_prompts"] = [{"prompt": f"unseen {i}", "denoising_score": v}
                                    for i, v in enumerate([0.5, 1.25, None, 2.0])]
    render_html(results, folder)
    (_, args, kwargs), = [c for c in fast_plots if c[1][1] == "Per-prompt denoising score"]
    assert args[0] == [3.217, 2.5, 0.75]
    assert kwargs == {"threshold": 2.875, "reference": [0.5, 1.25, 2.0]}
    # and the SVG plots both series on shared bins
    monkeypatch.undo()
    seen = []
    real = report_plots.histogram_counts
    monkeypatch.setattr(report_plots, "histogram_counts",
                        lambda series, **kw: seen.append(series) or real(series, **kw))
    both = histogram_svg([3.217, 2.5, 0.75], "t", "x", threshold=2.875, reference=[0.5, 1.25, 2.0])
    alone = histogram_svg([3.217, 2.5, 0.75], "t", "x", threshold=2.875)
    assert seen == [[[3.217, 2.5, 0.75], [0.5, 1.25, 2.0]], [[3.217, 2.5, 0.75]]]
    assert {b.get("data-series") for b in ET.fromstring(both).iter("rect") if b.get("class") == "bar"} == {"0", "1"}
    assert {b.get("data-series") for b in ET.fromstring(alone).iter("rect") if b.get("class") == "bar"} == {"0"}
    assert "reference prompts (n=3)" in both and "reference prompts" not in alone


# ---------------------------------------------------------------------------------------------- flagged cards


@pytest.fixture
def roundtrip(audit):
    """The audit with the VAE round trip of training image 0 beside it, and grid sizes to compare with."""
    folder, results, grids, train = audit
    drawn = _png(folder / "train/t0000-vae.png", (120, 50, 60))
    results["prompts"][0].update(train_roundtrip="train/t0000-vae.png", grid_columns=2)
    results["prompts"][1]["grid_columns"] = 2
    return folder, results, grids, train, drawn


def _img_width(page, data):
    match = re.search(r'<img src="data:image/png;base64,' + re.escape(_b64(data)) + r'" alt="[^"]*" style="width:'
                      r'([0-9.]+)px">', page)
    assert match, "image not embedded with a width"
    return float(match.group(1))


def test_training_image_and_its_vae_round_trip_at_the_size_of_one_tile(roundtrip, fast_plots):
    folder, results, grids, train, drawn = roundtrip
    page = render_html(results, folder)
    assert _b64(drawn) in page and ROUNDTRIP_CAPTION in html.unescape(page)
    # grids are 16 px wide in 2 columns: one tile is 8 px, and so are the training image and its round trip
    assert _img_width(page, grids[0]) == 16 and _img_width(page, train[0]) == 8 and _img_width(page, drawn) == 8
    assert _img_width(page, grids[1]) == 16 and _img_width(page, train[1]) == 8
    assert "white-space:nowrap" in page  # caption labels never wrap mid-label
    text = _text(page)
    assert ("distance: RMS pixel difference on [0, 1] over the whole image between the clique's medoid and the "
            "training image") in text
    results["settings"].update(tiles=4, extraction_size=64, edge_threshold_used=0.125)
    text = _text(render_html(results, folder))
    assert "over the whole image at ≤64 px between" in text
    assert "extracted when under δ = 0.1. Generations are joined when the maximum over 4×4 tiles of the per-tile " \
           "RMS difference is under 0.125" in text


def test_large_tiles_are_shown_smaller_at_one_scale(roundtrip, fast_plots):
    folder, results, _, _, _ = roundtrip
    big = _png(folder / "grids/big.png", (90, 90, 90), (1024, 256))  # 4 tiles of 256 px
    results["prompts"][0].update(grid="grids/big.png", grid_columns=4)
    page = render_html(results, folder)
    assert _img_width(page, big) == 4 * report.MAX_TILE_CSS_PX
    assert _img_width(page, (folder / "train/t0000.png").read_bytes()) == report.MAX_TILE_CSS_PX


def test_old_results_infer_the_tile_from_the_training_image(audit, fast_plots):
    folder, results, grids, train = audit  # no grid_columns: 16 px grid, 8 px training image
    page = render_html(results, folder)
    assert _img_width(page, grids[0]) == 16 and _img_width(page, train[0]) == 8


@pytest.mark.parametrize("how", ["argument", "results"])
def test_round_trip_withheld_under_redaction(roundtrip, fast_plots, how):
    folder, results, grids, train, drawn = roundtrip
    (folder / "grids/copy.png").write_bytes(drawn)
    results["prompts"][1]["grid"] = "grids/copy.png"  # a grid byte-identical to the round trip
    page = render_html(results, folder, redact=True) if how == "argument" \
        else render_html(dict(results, redacted=True), folder)
    for data in (*train, drawn):
        assert _b64(data) not in page
    assert "t0000-vae.png" not in page and ROUNDTRIP_CAPTION not in html.unescape(page)
    assert "grids/copy.png is identical to a training image" in page
    assert _b64(grids[0]) in page


def test_withheld_generations_of_an_extracted_prompt(audit, fast_plots):
    folder, results, grids, _ = audit
    results = copy.deepcopy(results)
    results["redacted"] = True
    for p in results["prompts"]:
        p["train_image"] = None
    results["prompts"][0].update(grid=None, grid_withheld=True)
    results["prompts"][1]["grid_withheld"] = False
    page = render_html(results, folder)
    assert page.count("generations withheld (redacted): the audit matched them to a training image") == 1
    assert "(no image)" not in page
    assert _b64(grids[0]) not in page and _b64(grids[1]) in page


def test_old_results_without_the_new_keys_still_render(audit, fast_plots):
    folder, results, grids, train = audit
    for key in ("n_train", "reference_amd", "mitigation", "quality", "alignment"):
        assert key not in results["summary"]
    assert "reference_prompts" not in results and "reference_prompts" not in results["settings"]
    assert not any({"train_roundtrip", "grid_columns", "grid_withheld"} & set(p) for p in results["prompts"])
    page = render_html(results, folder)
    assert '<div class="verdict extracted">' in page and "<details" in page
    assert _b64(grids[0]) in page and _b64(train[0]) in page
    assert ROUNDTRIP_CAPTION not in html.unescape(page) and "withheld" not in page


# ---------------------------------------------------------------------------------------------- redacted copies


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_write_redacted_report(roundtrip, fast_plots, tmp_path):
    folder, results, grids, train, drawn = roundtrip
    write_results(folder, results)
    write_report(folder)
    before = _snapshot(folder)
    assert "report.html" in before and "train/t0000-vae.png" in before

    path = write_redacted_report(folder / "results.json", tmp_path / "shared")
    new = tmp_path / "shared"
    assert path == new / "report.html"
    assert _snapshot(folder) == before  # the audit, its report included, is untouched
    copied = _snapshot(new)
    assert sorted(copied) == [".memaudit-output.json", "grids/p0001.png", "grids/p0002.png", "report.html", "results.json"]
    forbidden = {*train, drawn, grids[0]}  # training images and the extracted prompt's generations
    assert not forbidden & set(copied.values())
    assert not (new / "train").exists()
    assert copied["grids/p0001.png"] == grids[1]
    redacted = load_results(new)
    assert redacted["redacted"] is True
    assert all(p.get("train_image") is None and p.get("train_roundtrip") is None for p in redacted["prompts"])
    assert redacted["prompts"][0]["grid"] is None and redacted["prompts"][0]["grid_withheld"] is True
    assert redacted["prompts"][1]["grid"] == "grids/p0001.png" and "grid_withheld" not in redacted["prompts"][1]
    assert redacted["summary"] == results["summary"]
    page = copied["report.html"].decode("utf-8")
    assert REDACTED_BANNER in page and _b64(grids[1]) in page
    assert "generations withheld (redacted): the audit matched them to a training image" in page
    for data in forbidden:
        assert _b64(data) not in page
    assert _leftovers(tmp_path) == []
    # again into the same copy: replaced whole
    assert write_redacted_report(folder, new) == path and _snapshot(new) == copied


def test_write_redacted_report_never_copies_a_grid_that_is_a_training_image(audit, fast_plots, tmp_path):
    folder, results, grids, train = audit
    (folder / "grids/copy.png").write_bytes(train[1])
    results["prompts"][1]["grid"] = "grids/copy.png"
    results["prompts"][2]["grid"] = "train/t0005.png"
    write_results(folder, results)
    write_redacted_report(folder, tmp_path / "shared")
    copied = _snapshot(tmp_path / "shared")
    assert sorted(copied) == [".memaudit-output.json", "report.html", "results.json"]
    redacted = load_results(tmp_path / "shared")
    assert [(p["grid"], p.get("grid_withheld")) for p in redacted["prompts"]] == [(None, True)] * 3


def test_write_redacted_report_refuses_unsafe_folders(audit, fast_plots, tmp_path):
    folder, _, _, _ = audit
    before = _snapshot(folder)
    for bad, needle in ((folder, "inside the audit folder"), (folder / "shared", "inside the audit folder"),
                        (tmp_path, "contains the audit folder")):
        with pytest.raises(DataError, match=needle) as info:
            write_redacted_report(folder, bad)
        assert "\n" not in str(info.value) and "pass a new folder" in str(info.value)
    other = tmp_path / "other"
    (other / "notes.txt").parent.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MemauditError, match="did not write for `memaudit report --redact`.*pass a new or empty folder"):
        write_redacted_report(folder, other)
    unredacted = tmp_path / "unredacted"
    write_results(unredacted, _results())
    with pytest.raises(MemauditError, match="did not write for `memaudit report --redact`"):
        write_redacted_report(folder, unredacted)
    assert (other / "notes.txt").read_text() == "mine" and load_results(unredacted)["redacted"] is False
    assert _snapshot(folder) == before and _leftovers(tmp_path) == []


def test_write_report_redact_makes_a_sibling_copy(audit, fast_plots):
    folder, results, grids, train = audit
    original = write_report(folder).read_bytes()
    path = write_report(folder / "results.json", redact=True)
    assert path == folder.parent / "audit-redacted" / "report.html"
    assert (folder / "report.html").read_bytes() == original
    page = path.read_text(encoding="utf-8")
    assert REDACTED_BANNER in page and _b64(train[0]) not in page and _b64(grids[0]) not in page
    # results that are already redacted are rebuilt in place: there is nothing to leak
    copy_before = _snapshot(path.parent)
    path.write_text("stale")
    again = write_report(path.parent, redact=True)
    assert again == path and _snapshot(path.parent) == copy_before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["audit", "audit-redacted"]



def test_detection_below_chance_is_called_so(audit):
    _, results, _, _ = audit
    det = results["summary"]["detection"]
    det.update(n_pos=79, n_neg=2000, auc=0.27, label_source="extraction attack verdicts; reference prompts")
    results["settings"]["reference_prompts"] = 2000
    assert detection_note(results).startswith("AUC 0.27 is below chance: ")
    det.update(auc=0.9)
    assert detection_note(results) is None
