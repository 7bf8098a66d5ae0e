"""Detection on the fashion setting's partly memorizing full fine-tune: benchmarks/RESULTS.md section 17.

Labels come from the extraction attack: ``benchmarks/duplication.py``'s audit of the bundled full fine-tune
(10 generations per product caption, a clique of 5, delta 0.15) marks each of the 180 fine-tune products extracted
or not. The 200 held-out products' captions (same caption form, never trained on) are further non-memorized prompts.

Scores are Wen et al.'s denoising strength, ||eps(x_t, prompt) - eps(x_t, empty)||, read from one sampling pass of
4 generations per caption (the audit's own first 4 initial latents for the fine-tune products; the audit's
reference-seed stream for the held-out captions), 25 DDIM steps, guidance 4: at the first step only and averaged
over all 25 steps, from 1 generation and the mean of 4 (the columns of Jeon et al.'s Table 1). Two negative sets:
the held-out captions only (memorized against never seen, as in the papers), and every prompt not extracted
(held-out and trained-but-not-extracted products: the harder, practical question). The triage
(``triage_fashion.png``): rank the 180 trained captions by each score, attack only the top fraction, and count the
extracted products found (the full attack's labels) against the denoiser evaluations spent, scoring included. And where the unconditional branch (the empty prompt, the
score's reference) draws: 100 unconditional generations of the base and of the full fine-tune, each matched to its
nearest fine-tune product. Writes ``detection_fashion.json``, ``roc_fashion.png`` and ``triage_fashion.png``.

    python benchmarks/duplication.py            # first: the audits that give the labels (resumes)
    python benchmarks/detection_fashion.py      # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import machine

from memaudit.audit import AuditConfig
from memaudit.audit.config import reference_seed
from memaudit.core.digests import tree_digest
from memaudit.core.io import atomic_write_json
from memaudit.core.provenance import versions
from memaudit.demo import fashion
from memaudit.demo.settings import SETTINGS
from memaudit.metrics.detection import DetectionSummary, plot_roc, summarize
from memaudit.sampling import Sampler
from memaudit.target import load_target

HERE = Path(__file__).resolve().parent
GENERATIONS = 4
#: shares of the trained captions the triage attacks (highest scores first)
TRIAGE_FRACTIONS = tuple(round(0.05 * k, 2) for k in range(1, 21))
logger = logging.getLogger("benchmarks.detection_fashion")


@torch.no_grad()
def step_norms(model: Path, prompts: list[str], config: AuditConfig, seed: int, device: str) -> np.ndarray:
    """``[len(prompts), GENERATIONS, steps]`` guidance norms of one sampling pass."""
    sampler = Sampler(load_target(str(model), device=device), steps=config.steps, guidance=config.guidance,
                      batch_size=config.batch_size, seed=seed)
    out = np.zeros((len(prompts), GENERATIONS, config.steps), dtype=np.float32)
    for batch in sampler.run(prompts, GENERATIONS):
        out[batch.prompt_index.numpy(), batch.generation.numpy()] = batch.guidance_norms.numpy()
    return out


def scores(norms: np.ndarray) -> dict[str, np.ndarray]:
    """Per prompt: first step or all steps, from 1 generation or the mean of all."""
    return {"first step, 1 gen": norms[:, 0, 0], f"first step, {GENERATIONS} gens": norms[:, :, 0].mean(1),
            "all steps, 1 gen": norms[:, 0].mean(1), f"all steps, {GENERATIONS} gens": norms.mean((1, 2))}


def scoring_evals(score_name: str, steps: int) -> int:
    """Denoiser evaluations per prompt that a score costs (one per image per step, a guided step counted once, as
    in ``speed.py --part triage``): its generations times the steps it reads."""
    gens = GENERATIONS if f"{GENERATIONS} gens" in score_name else 1
    return gens * (1 if score_name.startswith("first step") else steps)


def triage(score: np.ndarray, extracted: np.ndarray, score_evals: int, attack_evals: int,
           fractions=TRIAGE_FRACTIONS) -> list[dict]:
    """Score every trained caption, run the full attack on the highest-scoring ``fraction`` only: per fraction, the
    share of the attack's extracted products found (the full attack's labels: a product counts as found when it
    is among those attacked) and the share of the full attack's denoiser evaluations spent (scoring included)."""
    order = np.argsort(-score, kind="stable")
    n, total = len(score), int(extracted.sum())
    rows = []
    for fraction in fractions:
        k = int(np.ceil(fraction * n))
        found = int(extracted[order[:k]].sum())
        spent = n * score_evals + k * attack_evals
        rows.append({"fraction": fraction, "prompts": k, "found": found,
                     "found_share": found / total if total else float("nan"),
                     "evals": spent, "evals_share": spent / (n * attack_evals)})
    return rows


def plot_triage(curves: dict[str, list[dict]], path: Path) -> None:
    """Extracted products found against the share of the full attack's denoiser evaluations spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, rows in curves.items():
        ax.plot([r["evals_share"] for r in rows], [r["found_share"] for r in rows], marker="o", ms=3, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="attack in random order")
    ax.set_xlabel("denoiser evaluations spent (share of the full attack)")
    ax.set_ylabel("extracted products found (share)")
    ax.set_xlim(0, max(1.0, *(r["evals_share"] for rows in curves.values() for r in rows)) * 1.02)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


@torch.no_grad()
def unconditional_pull(model: Path, n: int, seed: int, steps: int) -> dict:
    """Where ``model``'s unconditional generations (the empty prompt, no guidance: the branch the denoising score
    subtracts) land: per duplication level, how many of ``n`` have their nearest fine-tune product (RMS over
    pixels in [0, 1]) at that level, next to the level's share of the fine-tune set's images; and how many lie
    within RMS 0.1 of it (near copies)."""
    from diffusers import StableDiffusionPipeline

    products = fashion.read_products()
    train = products["split"] == "train"
    refs = torch.as_tensor(fashion.to_model(products["images"][train])).reshape(int(train.sum()), -1).float()
    copies = products["copies"][train]
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([""] * n, num_inference_steps=steps, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    flat = images.reshape(n, -1).float()
    dist = torch.cdist(flat, refs) / flat.shape[1] ** 0.5
    nearest, rms = dist.argmin(1).numpy(), dist.min(1).values.numpy()
    weight = {int(c): int((copies == c).sum()) * int(c) for c in fashion.COPIES}
    return {"generations": n, "seed": seed, "near_copies": int((rms < 0.1).sum()), "median_rms": float(np.median(rms)),
            "by_copies": {int(c): {"nearest": int((copies[nearest] == c).sum()),
                                   "share_of_fine_tune_images": weight[int(c)] / sum(weight.values())}
                          for c in fashion.COPIES}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "zoo" / "duplication",
                    help="duplication.py's --work (its audit of the full fine-tune gives the labels)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    labels_from = args.work / "audits" / "full_FT" / "results.json"
    if not labels_from.is_file():
        raise SystemExit(f"{labels_from} is missing: run python benchmarks/duplication.py first.")
    audit = json.loads(labels_from.read_text())
    setting = SETTINGS["fashion"]
    config = AuditConfig(**{**setting.audit, "seed": 0, "device": args.device})
    products = fashion.read_products()
    copies = {str(c): int(k) for c, k in zip(products["caption"], products["copies"])}
    trained = [p["prompt"] for p in audit["prompts"]]
    extracted = np.array([int(p["extracted"]) for p in audit["prompts"]])
    heldout = fashion.products_dataset("heldout").captions
    model = setting.models["full_ft"]
    # the sampling pass, kept so that a rerun only recomputes the tables; tied to the model's content digest (the
    # labels' audit is too, in duplication.py), so a rebuilt model is sampled again
    kept, digest = args.work / "detection_norms.npz", tree_digest(model)
    fresh = False
    if kept.is_file():
        with np.load(kept) as f:
            fresh = "model_digest" in f.files and str(f["model_digest"]) == digest
    if fresh:
        with np.load(kept) as f:
            norms_train, norms_held, wall = f["trained"], f["heldout"], float(f["wall"])
    else:
        t0 = time.perf_counter()
        norms_train = step_norms(model, trained, config, config.seed, args.device)
        norms_held = step_norms(model, heldout, config, reference_seed(config), args.device)
        wall = time.perf_counter() - t0
        np.savez(kept.with_suffix(".tmp.npz"), trained=norms_train, heldout=norms_held, wall=wall,
                 model_digest=np.array(digest))
        kept.with_suffix(".tmp.npz").replace(kept)
    s_train, s_held = scores(norms_train), scores(norms_held)
    negatives = {"held-out captions": (extracted == 1, np.ones(len(heldout), bool)),
                 "every prompt not extracted": (np.ones(len(trained), bool), np.ones(len(heldout), bool))}
    table, curves = {}, {}
    for neg_name, (keep_train, keep_held) in negatives.items():
        for score_name in s_train:
            s = np.concatenate([s_train[score_name][keep_train], s_held[score_name][keep_held]])
            y = np.concatenate([extracted[keep_train], np.zeros(int(keep_held.sum()), int)])
            summary = summarize(s, y)
            table[f"{neg_name} | {score_name}"] = summary.to_dict()
            curves[f"{score_name}, vs {neg_name}"] = DetectionSummary(**summary.to_dict())
    plot_roc(curves, HERE / "roc_fashion.png")
    attack_evals = config.generations * config.steps
    triaged = {name: triage(s_train[name], extracted, scoring_evals(name, config.steps), attack_evals)
               for name in s_train}
    plot_triage(triaged, HERE / "triage_fashion.png")
    by_level = {}
    for level in fashion.COPIES:
        rows = [i for i, p in enumerate(trained) if copies[p] == level]
        by_level[level] = {"products": len(rows), "extracted": int(extracted[rows].sum()),
                           "first_step_4": float(s_train[f"first step, {GENERATIONS} gens"][rows].mean()),
                           "all_steps_4": float(s_train[f"all steps, {GENERATIONS} gens"][rows].mean())}
    by_level["held-out"] = {"products": len(heldout), "extracted": 0,
                            "first_step_4": float(s_held[f"first step, {GENERATIONS} gens"].mean()),
                            "all_steps_4": float(s_held[f"all steps, {GENERATIONS} gens"].mean())}
    pull = {name: unconditional_pull(setting.models[name], 100, config.seed, config.steps)
            for name in ("base", "full_ft")}
    record = {"command": "python benchmarks/detection_fashion.py", "machine": machine(args.device),
              "versions": versions(), "labels": str(labels_from.relative_to(HERE.parent)) if
              labels_from.is_relative_to(HERE.parent) else str(labels_from),
              "audit_settings": audit["settings"], "generations": GENERATIONS, "sampling_wall_time_s": wall,
              "positives": int(extracted.sum()), "trained_not_extracted": int(len(extracted) - extracted.sum()),
              "heldout": len(heldout), "detection": table, "by_copies": by_level, "triage": triaged,
              "unconditional": pull,
              "scores": {"trained": {k: v.tolist() for k, v in s_train.items()},
                         "heldout": {k: v.tolist() for k, v in s_held.items()}, "extracted": extracted.tolist()}}
    atomic_write_json(HERE / "detection_fashion.json", record)
    print(f"Machine: {record['machine']}; {record['positives']} extracted products (positives), "
          f"{record['trained_not_extracted']} trained but not extracted, {len(heldout)} held-out captions\n")
    print("| negatives | score | AUC | TPR at 1% FPR | positives / negatives |")
    print("|---|---|---|---|---|")
    for key, s in table.items():
        neg, score = key.split(" | ")
        print(f"| {neg} | {score} | {s['auc']:.3f} | {s['tpr_at_1pct']:.3f} | {s['n_pos']} / {s['n_neg']} |")
    print("\n| score | attacked | extracted found | evaluations spent (of the full attack) |\n|---|---|---|---|")
    for name, rows in triaged.items():
        for r in rows:
            if r["fraction"] in (0.1, 0.2, 0.3, 0.5):
                print(f"| {name} | {r['prompts']} | {r['found']} ({r['found_share']:.0%}) | {r['evals_share']:.1%} |")
    print("\n| copies | products | extracted | mean first-step score (4 gens) | mean all-steps score (4 gens) |")
    print("|---|---|---|---|---|")
    for level, r in by_level.items():
        print(f"| {level} | {r['products']} | {r['extracted']} | {r['first_step_4']:.3f} | {r['all_steps_4']:.3f} |")
    print("\n| model | unconditional generations nearest a product of 1, 2, 4, 8, 16, 32 copies | within RMS 0.1 |")
    print("|---|---|---|")
    shares = ", ".join(f"{v['share_of_fine_tune_images']:.0%}" for v in pull["full_ft"]["by_copies"].values())
    print(f"| (share of the fine-tune set's images) | {shares} | |")
    for name, r in pull.items():
        counts = ", ".join(str(v["nearest"]) for v in r["by_copies"].values())
        print(f"| {name} | {counts} (of {r['generations']}) | {r['near_copies']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
