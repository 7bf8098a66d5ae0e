"""Audit results on disk (``results.json``) and the self-contained HTML report built from them.

An audit writes an output folder holding ``results.json`` and the PNG files it references by relative path
(one grid of generations per flagged prompt, and, unless redacted, the nearest training image of each flagged
prompt and that image after the model's VAE). :func:`render_html` / :func:`write_report` rebuild a single HTML file
from that folder alone: every image is embedded as a base64 ``data:`` URI and the histograms are inline SVG, so the
page needs no network, no external file and no JavaScript (a Content-Security-Policy in the page forbids all three).

The page reads as a privacy reviewer reads it: first a one-sentence verdict (training images reproduced, only
near-identical generations, or nothing flagged) with three numbers (prompts flagged, training images extracted,
AMD against the reference prompts' AMD), then the summary table with a plain sentence on when the detection AUC
means little, the flagged prompts (generations, nearest training image at the size of one generation tile, and
that image through the model's VAE), the distributions, the ROC, the table of all prompts, and last, folded in a
``<details>`` element, the model, data, machine, versions, seeds and settings.

The package, by responsibility (lowest first):

- :mod:`~memaudit.report.schema`: ``results.json``, its schema (documented there), :func:`write_results` and
  :func:`load_results`, with validation;
- :mod:`~memaudit.report.text`: numbers and text as the report writes them;
- :mod:`~memaudit.report.plots`: the histograms (inline SVG) and the ROC curve (PNG), and :func:`new_figure` /
  :func:`figure_png` for matplotlib figures drawn without pyplot;
- :mod:`~memaudit.report.prose`: the sentences: :func:`verdict`, :func:`detection_note`,
  :func:`distance_explanation`, :func:`adapter_line`;
- :mod:`~memaudit.report.images`: image files read into ``data:`` URIs, refusing paths outside the results folder
  and, when redacted, training images;
- :mod:`~memaudit.report.cards`: the flagged-prompt cards;
- :mod:`~memaudit.report.html`: the page, :func:`render_html`;
- :mod:`~memaudit.report.redact`: what redaction leaves out (documented there), :func:`redact_results` and
  :func:`write_redacted_report`;
- :mod:`~memaudit.report.write`: :func:`write_report`, and the checks before a report replaces a file.

Everything other code imports from ``memaudit.report`` is re-exported here.
"""

from memaudit.report.cards import ROUNDTRIP_CAPTION
from memaudit.report.html import MAX_PROMPTS, MAX_TABLE_ROWS, REDACTED_BANNER, reference_scores, render_html
from memaudit.report.images import MAX_IMAGE_BYTES, MAX_TILE_CSS_PX, png_size
from memaudit.report.plots import figure_png, histogram_counts, histogram_svg, new_figure, nice_ticks, roc_png
from memaudit.report.prose import SMALL_CLASS, adapter_line, detection_note, distance_explanation, verdict
from memaudit.report.redact import redact_results, write_redacted_report
from memaudit.report.schema import (
    KIND,
    REPORT_NAME,
    REQUIRED_KEYS,
    REQUIRED_PROMPT_KEYS,
    REQUIRED_SUMMARY_KEYS,
    RESULTS_NAME,
    SCHEMA_VERSION,
    load_results,
    write_results,
)
from memaudit.report.write import REDACTED_SUFFIX, check_report_file, write_report

__all__ = [
    "KIND",
    "MAX_IMAGE_BYTES",
    "MAX_PROMPTS",
    "MAX_TABLE_ROWS",
    "MAX_TILE_CSS_PX",
    "REDACTED_BANNER",
    "REDACTED_SUFFIX",
    "REPORT_NAME",
    "REQUIRED_KEYS",
    "REQUIRED_PROMPT_KEYS",
    "REQUIRED_SUMMARY_KEYS",
    "RESULTS_NAME",
    "ROUNDTRIP_CAPTION",
    "SCHEMA_VERSION",
    "SMALL_CLASS",
    "adapter_line",
    "check_report_file",
    "detection_note",
    "distance_explanation",
    "figure_png",
    "histogram_counts",
    "histogram_svg",
    "load_results",
    "new_figure",
    "nice_ticks",
    "png_size",
    "redact_results",
    "reference_scores",
    "render_html",
    "roc_png",
    "verdict",
    "write_redacted_report",
    "write_report",
    "write_results",
]
