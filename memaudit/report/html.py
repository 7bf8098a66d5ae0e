"""The report as one self-contained HTML page, assembled from the results and the image files beside them.

Every image is embedded as a base64 ``data:`` URI and the histograms are inline SVG, so the page needs no network,
no external file and no JavaScript (a Content-Security-Policy in the page forbids all three). The page reads as a
privacy reviewer reads it: the verdict and three numbers, the summary table, the flagged prompts
(:mod:`memaudit.report.cards`), the distributions, the ROC, the table of all prompts, and last, folded, the model,
data, machine, versions, seeds and settings.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from memaudit import __version__
from memaudit.core.errors import DataError
from memaudit.report.cards import flagged_cards
from memaudit.report.images import Images
from memaudit.report.plots import histogram_svg, roc_png, rocs_png
from memaudit.report.prose import adapter_line, detection_note, reference_count, verdict
from memaudit.report.schema import RESULTS_NAME
from memaudit.report.text import as_int, compact, esc, finite_float, finite_floats, fmt, fmt_seconds

MAX_PROMPTS = 50
MAX_TABLE_ROWS = 1000
REDACTED_BANNER = "REDACTED: no training images"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.meta th{width:13em}
.banner{background:#b00020;color:#fff;font-weight:bold;padding:.6em 1em;margin:.8em 0;font-size:1.15em;
border-radius:4px}
.verdict{border:2px solid;border-left-width:8px;border-radius:4px;padding:.7em 1em;margin:1em 0;font-size:1.15em;
font-weight:600}
.verdict.extracted{background:#fdecea;border-color:#b00020;color:#7a0016}
.verdict.flagged{background:#fff4e0;border-color:#c77700;color:#6b4000}
.verdict.clean{background:#e9f6ec;border-color:#2e7d32;color:#1b4d1f}
.headline{display:flex;flex-wrap:wrap;gap:1em;margin:.6em 0 1em}
.headline .num{border:1px solid #ddd;border-radius:4px;padding:.5em .9em;flex:1 1 16em;font-size:1.05em}
.headline .num .big{font-size:1.5em;font-weight:700;font-variant-numeric:tabular-nums}
.headline .num .detail{display:block;font-size:.85em;color:#555}
.explain{max-width:60em}
.note{color:#666;font-style:italic}
.card{border:1px solid #ddd;border-radius:6px;padding:.8em;margin:1em 0}
.card .prompt{font-weight:600;word-break:break-word;white-space:pre-wrap}
.pair{display:flex;flex-wrap:wrap;gap:1em;margin-top:.6em;align-items:flex-start}
.pair figure{margin:0;max-width:100%;min-width:0;overflow-x:auto}
.pair figcaption{font-size:.85em;color:#555}
.pair figcaption span{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:100%}
.pair img{max-width:none;height:auto;image-rendering:pixelated;border:1px solid #ccc;display:block}
.plot img,.plot svg{max-width:100%;height:auto}
td.p{word-break:break-word;max-width:40em}
.yes{color:#b00020;font-weight:600}
details.settings{margin-top:2em;border-top:2px solid #ddd;padding-top:.6em}
details.settings summary{font-size:1.2em;font-weight:600;cursor:pointer}
"""


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def _plot(png: bytes, alt: str) -> str:
    return f'<div class="plot">{_img("data:image/png;base64," + base64.b64encode(png).decode("ascii"), alt)}</div>'


def _svg_plot(svg: str) -> str:
    return f'<div class="plot">{svg}</div>'


def _row(label: str, value: str, detail: str = "") -> str:
    return f"<tr><th>{esc(label)}</th><td class=\"n\">{esc(value)}</td><td>{esc(detail)}</td></tr>"


def _pct(part: Any, whole: Any) -> str:
    if isinstance(part, int) and isinstance(whole, int) and not isinstance(part, bool) and whole > 0:
        return f"{100.0 * part / whole:.3g}% of {whole}"
    return ""


def _headline(results: dict) -> list[str]:
    """The verdict box and the three numbers a reviewer needs first."""
    s = results.get("summary") or {}
    kind, sentence = verdict(results)
    n = as_int(s.get("n_prompts"))
    flagged = s.get("flagged_prompts")
    images = s.get("extracted_training_images")
    n_train = as_int(s.get("n_train"))
    amd, ref_amd = finite_float(s.get("amd")), finite_float(s.get("reference_amd"))
    if amd is None:
        amd_detail = "not computed"
    elif ref_amd is not None:
        amd_detail = (f"generations for the reference prompts: {fmt(ref_amd)}; lower means closer to the "
                      "training set")
    else:
        amd_detail = "lower means closer to the training set (no reference prompts to compare with)"
    numbers = [
        (fmt(flagged), f"of {fmt(n)} prompts flagged" if n is not None else "prompts flagged", ""),
        (fmt(images), (f"of {n_train} training images extracted" if n_train is not None
                        else ("training image extracted" if images == 1 else "training images extracted")), ""),
        ("AMD " + fmt(amd), "", amd_detail),
    ]
    out = [f'<div class="verdict {kind}">{esc(sentence)}</div>', '<div class="headline">']
    for big, text, detail in numbers:
        out.append(f'<div class="num"><span class="big">{esc(big)}</span> {esc(text)}'
                   + (f'<span class="detail">{esc(detail)}</span>' if detail else "") + "</div>")
    out.append("</div>")
    return out


def _settings(results: dict) -> list[str]:
    """Where the numbers come from, folded at the end of the page: model, data, machine, versions, seeds, settings."""
    versions = results.get("versions") or {}
    seeds = results.get("seeds") or {}
    meta = [
        ("Model", results.get("model")),
        *([("LoRA adapters", "; ".join(adapter_line(a) for a in results["adapters"] if isinstance(a, dict)))]
          if isinstance(results.get("adapters"), list) and results["adapters"] else []),
        ("Training data", results.get("train")),
        ("Prompts", results.get("prompts_source")),
        *([("Held-out data", results["heldout"])] if results.get("heldout") else []),
        ("Machine", results.get("machine")),
        ("Created (UTC)", results.get("created_utc")),
        ("Versions", ", ".join(f"{k} {compact(v)}" for k, v in versions.items()) if isinstance(versions, dict)
         else compact(versions)),
        ("Seeds", "; ".join(f"{k}: {compact(v)}" for k, v in seeds.items()) if isinstance(seeds, dict)
         else compact(seeds)),
    ]
    out = ['<details class="settings"><summary>Settings, seeds and versions</summary>', '<table class="meta">']
    out += [f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in meta]
    out.append("</table>")
    settings = results.get("settings") or {}
    if isinstance(settings, dict) and settings:
        out.append("<h3>Settings</h3><table>")
        out += [f"<tr><th>{esc(k)}</th><td>{esc(compact(v))}</td></tr>" for k, v in settings.items()]
        out.append("</table>")
    out.append("</details>")
    return out


def _summary(results: dict) -> list[str]:
    s = results.get("summary") or {}
    n_prompts = s.get("n_prompts")
    rows = [
        _row("Prompts", fmt(n_prompts), f"{fmt(s.get('generations_per_prompt'))} generations per prompt"),
        _row("Images generated", fmt(s.get("n_images"))),
        _row("Flagged prompts", fmt(s.get("flagged_prompts")),
             f"{_pct(s.get('flagged_prompts'), n_prompts)}; clique of ≥ {fmt(s.get('min_clique'))} generations "
             f"at edge threshold {fmt(s.get('edge_threshold'))}".lstrip("; ")),
        _row("Extracted prompts", fmt(s.get("extracted_prompts")),
             f"{_pct(s.get('extracted_prompts'), n_prompts)}; δ = {fmt(s.get('delta'))}".lstrip("; ")),
        _row("Extracted training images", fmt(s.get("extracted_training_images"))),
        _row("AMD (average minimum cosine distance)", fmt(s.get("amd")),
             f"feature extractor: {fmt(s.get('feature_extractor'))}"),
        _row("Mean denoising strength", fmt(s.get("denoising_mean"))),
        _row("Calibrated denoising threshold", fmt(s.get("denoising_threshold")),
             f"FPR {fmt(s.get('denoising_threshold_fpr'))}"),
        _row("Prompts above the threshold", fmt(s.get("denoising_flagged")), _pct(s.get("denoising_flagged"), n_prompts)),
    ]
    det = s.get("detection")
    if isinstance(det, dict):
        rows += [
            _row("Detection AUC", fmt(det.get("auc")),
                 f"{fmt(det.get('n_pos'))} positives, {fmt(det.get('n_neg'))} negatives; "
                 f"labels: {fmt(det.get('label_source'))}"),
            _row("TPR at 1% FPR", fmt(det.get("tpr_at_1pct"))),
            _row("TPR at 0.1% FPR", fmt(det.get("tpr_at_01pct"))),
        ]
    q = s.get("quality")
    if isinstance(q, dict):
        rows += [
            _row("KID (held-out)", f"{fmt(q.get('kid'))} ± {fmt(q.get('kid_std'))}",
                 f"{fmt(q.get('feature_extractor'))} features; {fmt(q.get('n_fake'))} generations for the held-out "
                 f"captions against {fmt(q.get('n_real'))} held-out images"
                 + (f" ({fmt(q['heldout_in_train'])} of them also training images: they flatter the score)"
                    if q.get("heldout_in_train") else "")),
            _row("FID (held-out)", fmt(q.get("fid")),
                 f"{fmt(q.get('note'))}"),
        ]
    a = s.get("alignment")
    if isinstance(a, dict):
        rows.append(_row("Text-image alignment", fmt(a.get("mean"), 3),
                         f"scorer {fmt(a.get('scorer'))}, mean over {fmt(a.get('n_images'))} audited images"
                         + (f"; held-out captions {fmt(a.get('reference_mean'), 3)}" if a.get("reference_mean") is not None else "")))
    m = s.get("mitigation")
    if isinstance(m, dict):
        if m.get("kind") == "rwa":
            detail = f"random word addition, {fmt(m.get('rwa_words'))} tokens per prompt, drawn per image"
        else:
            detail = (f"prompt-embedding optimization to a per-image first-step norm of {fmt(m.get('norm_target'))} "
                      f"({fmt(m.get('norm_target_source'))}); norm {fmt(m.get('first_step_norm_before_mean'))} → "
                      f"{fmt(m.get('first_step_norm_after_mean'))}, {fmt(m.get('optimizer_steps_mean'), 2)} steps "
                      f"per batch, {fmt(m.get('images_over_target_after'))} of {fmt(m.get('images'))} images still "
                      "over the target")
        rows.append(_row("Inference-time mitigation", fmt(m.get("kind")), detail))
    rows += [
        _row("Wall time", fmt_seconds(s.get("wall_time_s"))),
        _row("Sampling time", fmt_seconds(s.get("sampling_time_s"))),
    ]
    out = ["<h2>Summary</h2>", "<table>", *rows, "</table>"]
    note = detection_note(results)
    if note:
        out.append(f'<p class="explain">{esc(note)}</p>')
    if s.get("denoising_note"):
        out.append(f'<p class="explain">{esc(s["denoising_note"])}</p>')
    if s.get("denoising_threshold") is None and reference_count(results) == 0:
        out.append('<p class="explain">No denoising threshold: it is calibrated on reference prompts known not to be '
                   "memorized, and this audit had none; pass --reference-prompts or --heldout.</p>")
    return out


def _histograms(results: dict) -> list[str]:
    s = results.get("summary") or {}
    out = ["<h2>Distributions</h2>"]
    amd = finite_floats(im.get("min_cosine_distance") for im in results.get("images") or [] if isinstance(im, dict))
    if amd:
        fx = s.get("feature_extractor")
        out.append(_svg_plot(histogram_svg(amd, "Per-image distance to the nearest training image",
                                           "min cosine distance" + (f" ({fx})" if fx else ""))))
    else:
        out.append('<p class="note">No per-image distances to training images in these results.</p>')
    den = finite_floats(p.get("denoising_score") for p in results.get("prompts") or [] if isinstance(p, dict))
    ref = reference_scores(results)
    if den:
        kwargs: dict[str, Any] = {"threshold": finite_float(s.get("denoising_threshold"))}
        if ref:
            kwargs["reference"] = ref
        out.append(_svg_plot(histogram_svg(den, "Per-prompt denoising score", "denoising score", **kwargs)))
    else:
        out.append('<p class="note">No per-prompt denoising scores in these results.</p>')
    return out


def reference_scores(results: dict) -> list[float]:
    """The finite denoising scores of the reference prompts (``results["reference_prompts"]``; [] when absent)."""
    ref = results.get("reference_prompts")
    if not isinstance(ref, list):
        return []
    return finite_floats(r.get("denoising_score") for r in ref if isinstance(r, dict))


def _roc(results: dict) -> list[str]:
    det = (results.get("summary") or {}).get("detection")
    if not isinstance(det, dict):
        return []
    out = ["<h2>Detection ROC</h2>"]
    fpr, tpr = det.get("fpr"), det.get("tpr")
    if not isinstance(fpr, list) or not isinstance(tpr, list) or not fpr:
        return out + ['<p class="note">No ROC curve points in these results.</p>']
    try:
        out.append(_plot(roc_png(fpr, tpr, finite_float(det.get("auc"))), "ROC curve, linear and log-log"))
    except (DataError, TypeError, ValueError) as exc:
        out.append(f'<p class="note">{esc(f"(ROC curve not drawn: {exc})")}</p>')
    return out


def _detectors(results: dict) -> list[str]:
    """Every detector of the audit: its cost, calibrated threshold, flagged prompts and detection against the
    extraction verdicts, in one table, and their ROC curves overlaid when both classes occurred."""
    s = results.get("summary") or {}
    dets = s.get("detectors")
    if not isinstance(dets, dict) or not dets:
        return []
    n_prompts = s.get("n_prompts")
    out = ["<h2>Detectors</h2>", "<table>",
           "<tr><th>detector</th><th>extra evaluations / image</th><th>threshold</th><th>prompts over it</th>"
           "<th>AUC</th><th>TPR at 1% FPR</th><th>TPR at 0.1% FPR</th><th>what it measures</th></tr>"]
    curves = []
    for name, d in dets.items():
        if not isinstance(d, dict):
            continue
        det = d.get("detection") if isinstance(d.get("detection"), dict) else {}
        what = fmt(d.get("summary")) + (f" ({fmt(d.get('source'))})" if d.get("source") else "")
        share = _pct(d.get("flagged"), n_prompts)
        flagged = fmt(d.get("flagged")) + (f" ({share})" if share else "")
        if d.get("reads_family") is False:
            what = "does not read this model's family; " + what
        out.append(f'<tr><td>{esc(name)}</td><td class="n">{esc(fmt(d.get("extra_calls_per_image")))}</td>'
                   f'<td class="n">{esc(fmt(d.get("threshold")))}</td>'
                   f'<td class="n">{esc(flagged)}</td>'
                   f'<td class="n">{esc(fmt(det.get("auc")))}</td><td class="n">{esc(fmt(det.get("tpr_at_1pct")))}</td>'
                   f'<td class="n">{esc(fmt(det.get("tpr_at_01pct")))}</td><td>{esc(what)}</td></tr>')
        if isinstance(det.get("fpr"), list) and isinstance(det.get("tpr"), list) and det["fpr"]:
            curves.append((f"{name} (AUC {fmt(det.get('auc'))})", det["fpr"], det["tpr"]))
    out.append("</table>")
    out.append('<p class="explain">Every score is oriented the same way: higher means more likely memorized. A '
               "threshold is calibrated on the reference prompts at the audit's false-positive rate; AUC and TPR "
               "judge each score against the extraction attack's verdicts (the reference prompts counted as not "
               "memorized), when both classes occur.</p>")
    if curves:
        try:
            out.append(_plot(rocs_png(curves), "ROC curves of every detector, linear and log-log"))
        except (DataError, TypeError, ValueError) as exc:
            out.append(f'<p class="note">{esc(f"(ROC curves not drawn: {exc})")}</p>')
    return out


def _table(results: dict, max_rows: int) -> list[str]:
    prompts = [p for p in results.get("prompts") or [] if isinstance(p, dict)]
    prompts.sort(key=lambda p: p.get("index") if isinstance(p.get("index"), int) else 0)
    out = ["<h2>All prompts</h2>", "<table>",
           "<tr><th>#</th><th>prompt</th><th>clique size</th><th>flagged</th><th>extracted</th>"
           "<th>denoising score</th><th>nearest distance</th></tr>"]
    for p in prompts[:max_rows]:
        flagged, extracted = bool(p.get("flagged")), bool(p.get("extracted"))
        out.append(
            f'<tr><td class="n">{esc(fmt(p.get("index")))}</td><td class="p">{esc(p.get("prompt"))}</td>'
            f'<td class="n">{esc(fmt(p.get("clique_size")))}</td>'
            f'<td{" class=yes" if flagged else ""}>{"yes" if flagged else "no"}</td>'
            f'<td{" class=yes" if extracted else ""}>{"yes" if extracted else "no"}</td>'
            f'<td class="n">{esc(fmt(p.get("denoising_score")))}</td>'
            f'<td class="n">{esc(fmt(p.get("nearest_train_distance")))}</td></tr>'
        )
    out.append("</table>")
    if len(prompts) > max_rows:
        out.append(f'<p class="note">{len(prompts) - max_rows} more prompt(s) not shown; '
                   "the full list is in results.json.</p>")
    return out


def render_html(results: dict, folder: str | os.PathLike, redact: bool = False, *,
                max_prompts: int = MAX_PROMPTS, max_table_rows: int = MAX_TABLE_ROWS) -> str:
    """The self-contained HTML report of ``results`` whose image paths are relative to ``folder``.

    Redacted when ``redact`` is true or ``results["redacted"]`` is: then no training image is read or embedded.
    A missing or unreadable image file is shown as a note, never an error.
    """
    redact = bool(redact) or bool(results.get("redacted"))  # any truthy marker redacts: err on the safe side
    images = Images(Path(folder), results, redact)
    title = "memaudit audit report" + (f" — {results.get('model')}" if results.get("model") else "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        "<h1>memaudit audit report</h1>",
        *([f'<div class="banner">{esc(REDACTED_BANNER)}</div>'] if redact else []),
        *_headline(results),
        *_summary(results),
        *flagged_cards(results, images, redact, max(0, int(max_prompts))),
        *_histograms(results),
        *_roc(results),
        *_detectors(results),
        *_table(results, max(0, int(max_table_rows))),
        *_settings(results),
        f'<footer><p class="note">Built by memaudit {esc(__version__)} from {esc(RESULTS_NAME)} and the image '
        f'files beside it{" (redacted)" if redact else ""}.</p></footer>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
