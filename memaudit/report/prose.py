"""The report's sentences, written from the results alone: the one-sentence verdict, when the detection AUC means
little, what the distances on the flagged-prompt cards mean, and one line per applied LoRA adapter.

The command line prints the same verdict after an audit (:func:`verdict`).
"""

from __future__ import annotations

from memaudit.report.text import as_int, finite_float, fmt


def _plural(n: int | None, word: str, plural: str | None = None) -> str:
    return f"{fmt(n)} {word if n == 1 else (plural or word + 's')}"


def _mitigation_kind(summary: dict) -> str | None:
    m = summary.get("mitigation")
    kind = m.get("kind") if isinstance(m, dict) else None
    return str(kind) if kind else None


def verdict(results: dict) -> tuple[str, str]:
    """``(kind, sentence)``: the audit's one-sentence verdict, ``kind`` one of ``"extracted"`` (training images were
    reproduced), ``"flagged"`` (near-identical generations, none within δ of a training image) and ``"clean"``
    (nothing flagged at these settings)."""
    s = results.get("summary") or {}
    n = as_int(s.get("n_prompts"))
    flagged = as_int(s.get("flagged_prompts")) or 0
    ext_prompts = as_int(s.get("extracted_prompts")) or 0
    ext_images = as_int(s.get("extracted_training_images"))
    kind = _mitigation_kind(s)
    mitigation = f" with {kind} mitigation on" if kind else ""
    delta = fmt(s.get("delta"))
    of_n = f" of {n}" if n is not None else ""
    if (ext_images or 0) > 0 or ext_prompts > 0:
        images = ext_images if ext_images is not None else ext_prompts
        n_train = as_int(s.get("n_train"))
        return "extracted", (
            f"The model reproduces its training images{mitigation}: {_plural(images, 'training image')}"
            f"{f' (of {n_train})' if n_train is not None else ''} extracted: for {ext_prompts}{of_n} prompts, a "
            f"clique of near-identical generations lies within δ = {delta} of a training image."
        )
    if flagged > 0:
        return "flagged", (
            f"The model repeats near-identical generations for {flagged}{of_n} prompts{mitigation}, but none matched "
            f"a training image within δ = {delta}: no training image was extracted."
        )
    g = as_int(s.get("generations_per_prompt"))
    budget = f"{fmt(n)} prompts × {fmt(g)} generations" + (f",{mitigation}" if mitigation else "")
    return "clean", (
        f"No prompt was flagged at these settings ({budget}): evidence against reproduction of training images at "
        "this sampling budget, not proof."
    )



def adapter_line(a: dict) -> str:
    """One applied LoRA adapter: its file, scale and SHA-256, and how much of it matched the model."""
    line = f"{a.get('file') or a.get('path')} at scale {fmt(a.get('scale'))} (SHA-256 {str(a.get('sha256'))[:12]}...)"
    if a.get("partial"):
        line += (f": PARTIAL, matched {fmt(a.get('modules_matched'))} of the {fmt(a.get('modules_named'))} modules its "
                 f"{fmt(a.get('keys'))} keys name")
    return line


def reference_count(results: dict) -> int | None:
    """How many reference prompts the audit had: ``settings.reference_prompts``, else the length of the
    ``reference_prompts`` list; None when the results do not say."""
    n = as_int((results.get("settings") or {}).get("reference_prompts"))
    if n is not None:
        return n
    ref = results.get("reference_prompts")
    return len(ref) if isinstance(ref, list) and ref else None


SMALL_CLASS = 5  # fewer positives or negatives than this and the AUC is only indicative


def detection_note(results: dict) -> str | None:
    """One or two plain sentences on when the detection AUC / TPR are not meaningful, or None when there is
    nothing to say (or nothing to judge)."""
    s = results.get("summary") or {}
    det = s.get("detection")
    n = as_int(s.get("n_prompts"))
    ext = as_int(s.get("extracted_prompts"))
    n_ref = reference_count(results)
    more = "pass --reference-prompts or --heldout"
    if not isinstance(det, dict):
        if not n or ext is None:
            return None
        if ext == n and not n_ref:
            return (f"AUC not computed: every audited prompt ({n} of {n}) is extracted and there are no reference "
                    f"prompts known not to be memorized, so all labels are positive; {more}.")
        if ext == 0:
            tail = {None: "", 0: " and there are no reference prompts"}.get(
                n_ref, f"; the {n_ref} reference prompts add only negatives")
            return f"AUC not computed: no audited prompt is extracted, so there is no memorized prompt to detect{tail}."
        return "AUC not computed: these results hold no detection summary."
    notes = []
    n_pos, n_neg = as_int(det.get("n_pos")), as_int(det.get("n_neg"))
    small = [_plural(k, word) for k, word in ((n_pos, "positive"), (n_neg, "negative"))
             if k is not None and k < SMALL_CLASS]
    if small:
        notes.append(f"AUC rests on only {' and '.join(small)}: treat it and the TPRs as indicative.")
    auc = finite_float(det.get("auc"))
    if auc is not None and auc < 0.5:
        notes.append(f"AUC {fmt(auc, 2)} is below chance: the denoising score is higher for the negatives than for "
                     "the memorized prompts, so on this model it does not point at memorization; trust the extraction "
                     "verdicts.")
    if n_neg is not None and 0 < n_neg < 1000:
        at = "0.1% FPR" if n_neg >= 100 else "1% and 0.1% FPR"
        notes.append(f"With {n_neg} negatives the smallest non-zero FPR is {fmt(1 / n_neg, 2)}, so the TPR at {at} "
                     "is the TPR with no false positive at all.")
    if "reference" not in str(det.get("label_source") or "").lower():
        notes.append("Labels come from the audited prompts only: the negatives are audited prompts the extraction "
                     "attack did not extract, not prompts known to be clean"
                     + (f"; {more} for known-clean negatives." if not n_ref else "."))
    return " ".join(notes) or None



def distance_explanation(results: dict) -> str:
    """What the distances on the flagged-prompt cards mean, from the settings the audit ran with."""
    s = results.get("summary") or {}
    settings = results.get("settings") if isinstance(results.get("settings"), dict) else {}
    size = as_int(settings.get("extraction_size"))
    tiles = as_int(settings.get("tiles"))
    edge = settings.get("edge_threshold_used")
    edge = edge if finite_float(edge) is not None else s.get("edge_threshold")
    over = f"{tiles}×{tiles} tiles" if tiles is not None else "tiles"
    return (
        "distance: RMS pixel difference on [0, 1] over the whole image"
        + (f" at ≤{size} px" if size is not None else "")
        + " between the clique's medoid and the training image (the prompt's own training image when known); "
        f"extracted when under δ = {fmt(s.get('delta'))}. Generations are joined when the maximum over {over} of "
        f"the per-tile RMS difference is under {fmt(edge)}; a prompt is flagged when at least "
        f"{fmt(s.get('min_clique'))} of its generations are all joined to each other."
    )
