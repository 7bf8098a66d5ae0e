"""Detection quality of the denoising-strength score where only some faces are memorized: benchmarks/RESULTS.md §9.

The *partially memorized* zoo variant: the bundled base fully fine-tuned on the 80 training faces, of which 8
(drawn with seed 0) appear 25 times each in the training list (as duplicated images do in LAION, or repeated
reports in MIMIC), for only 450 steps. Each other face is then seen about 53 times and each duplicated face about
1,300 times, so that the duplicated faces are reproduced and the rest are not (150 steps were too few).

That model, the base and the full fine-tune are audited with the demo's settings (80 training captions, 10
generations, DDIM 25 steps, guidance 4, clique of 5, delta 0.15). The extraction attack's verdicts are the labels
(a caption is memorized when its clique's medoid matches a training face); the scores are the denoising strength
of the same 10 generations per caption, at the first sampling step only and averaged over all 25 steps (Wen et al.
report AUC 0.99 on Stable Diffusion 1.4). Reported per model where both classes occur, and pooled over the three:
AUC and TPR at 1% FPR. Writes ``detection.json`` and ``roc.png``.

    python benchmarks/detection.py [--work benchmarks/zoo] [--device cpu]

The partial model and every audit are kept under ``--work`` and reused by a rerun (and by
``benchmarks/speed.py --part triage``).
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

HERE = Path(__file__).resolve().parent
PARTIAL = dict(n_duplicated=8, copies=25, steps=450, batch_size=32, learning_rate=3e-4, seed=0)
logger = logging.getLogger("benchmarks.detection")


def partial_dataset(train, n_duplicated: int, copies: int, seed: int):
    """``train`` with ``n_duplicated`` faces (drawn with ``seed``) repeated ``copies`` times; and their indices."""
    from memaudit.data import ImageCaptionDataset

    dup = sorted(np.random.default_rng(seed).choice(len(train), n_duplicated, replace=False).tolist())
    index = list(range(len(train))) + [i for i in dup for _ in range(copies - 1)]
    names = list(train.names) + [f"{train.names[i]}#copy{c}" for i in dup for c in range(2, copies + 1)]
    data = ImageCaptionDataset(images=train.images[index], captions=[train.captions[i] for i in index], names=names,
                               source=f"{train.source}, {n_duplicated} faces x{copies}")
    return data, dup


def partial_model(work: Path, device: str = "cpu") -> tuple[Path, list[int]]:
    """The partially memorized fine-tune under ``work`` (trained now, resumably, unless present)."""
    from memaudit import demo
    from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune

    p = PARTIAL
    data, dup = partial_dataset(demo.faces_dataset("train"), p["n_duplicated"], p["copies"], p["seed"])
    out = work / f"partial_ft_{p['steps']}"
    if not (out / SETTINGS_FILE).is_file():
        cfg = FinetuneConfig(method="full", steps=p["steps"], batch_size=p["batch_size"],
                             learning_rate=p["learning_rate"], seed=p["seed"], checkpoint_every=50)
        finetune(str(demo.BASE_MODEL), data, out, cfg, device=device)
    return out, dup


def audit(model: Path, out: Path, device: str = "cpu", **overrides) -> dict:
    """The demo audit of ``model`` into ``out`` (read back when it exists)."""
    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit
    from memaudit.demo.run import DEMO_SETTINGS

    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    train, heldout = demo.faces_dataset("train"), demo.faces_dataset("heldout")
    prompts = overrides.pop("prompts", train.captions)
    t0 = time.perf_counter()
    res = run_audit(str(model), train, out, prompts=prompts, heldout=heldout,
                    config=AuditConfig(**{**DEMO_SETTINGS, "seed": 0, "device": device, **overrides}))
    logger.info("audited %s in %.0f s", model, time.perf_counter() - t0)
    return res


@torch.no_grad()
def first_step_scores(model: Path, prompts: list[str], generations: int, seed: int = 0, device: str = "cpu",
                      steps: int = 25, guidance: float = 4.0, batch_size: int = 50) -> np.ndarray:
    """Per prompt, the mean first-step guidance norm over the same ``generations`` initial latents as the audit."""
    from memaudit.sampling import Sampler
    from memaudit.target import load_target

    sampler = Sampler(load_target(str(model), device=device), steps=steps, guidance=guidance, batch_size=batch_size,
                      seed=seed)
    return sampler.first_step_norms(prompts, generations).reshape(len(prompts), generations).mean(1).numpy()


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.audit import versions
    from memaudit.core.io import atomic_write_json
    from memaudit.metrics.detection import DetectionSummary, plot_roc, summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "zoo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    work = args.work / "detection"
    partial, dup = partial_model(work, args.device)
    full = args.work / "full_ft" if (args.work / "full_ft" / "model_index.json").is_file() else demo.FULL_FT_MODEL
    models = {"partially memorized": partial, "full FT": full, "base": demo.BASE_MODEL}
    train = demo.faces_dataset("train")
    per_model, pooled = {}, {"labels": [], "first": [], "all": []}
    # benchmarks/baselines.py audited the full fine-tune with exactly these settings: read it back when it is there
    earlier = {"full FT": args.work / "audits" / "full_FT"} if full == args.work / "full_ft" else {}
    for name, path in models.items():
        res = audit(path, earlier.get(name, work / "audits" / path.name), args.device)
        s = res["summary"]
        labels = np.array([p["extracted"] for p in res["prompts"]], dtype=int)
        all_steps = np.array([p["denoising_score"] for p in res["prompts"]])
        first = first_step_scores(path, train.captions, s["generations_per_prompt"], device=args.device)
        row = {"model": str(path), "extracted": int(labels.sum()), "prompts": len(labels),
               "extracted_training_images": s["extracted_training_images"], "amd": s["amd"],
               "first_step_mean": float(first.mean()), "all_steps_mean": float(all_steps.mean())}
        if name == "partially memorized":
            row["duplicated_faces"] = dup
            row["extracted_duplicated"] = int(labels[dup].sum())
            row["extracted_other"] = int(labels.sum() - labels[dup].sum())
        if 0 < labels.sum() < len(labels):
            row["first_step"] = summarize(first, labels).to_dict()
            row["all_steps"] = summarize(all_steps, labels).to_dict()
        per_model[name] = row
        pooled["labels"] += labels.tolist()
        pooled["first"] += first.tolist()
        pooled["all"] += all_steps.tolist()
    y = np.array(pooled["labels"])
    pooled_rows = {"first_step": summarize(np.array(pooled["first"]), y).to_dict(),
                   "all_steps": summarize(np.array(pooled["all"]), y).to_dict()}
    curves = {}
    for name, row in [*per_model.items(), ("pooled", pooled_rows)]:
        for key, label in (("first_step", "first step"), ("all_steps", "all steps")):
            if key in row:
                curves[f"{name}, {label}"] = DetectionSummary(**row[key])
    plot_roc(curves, HERE / "roc.png")
    record = {"command": "python benchmarks/detection.py", "versions": versions(), "partial_settings": PARTIAL,
              "models": per_model, "pooled": pooled_rows,
              "scores": pooled, "score_order": list(models)}
    atomic_write_json(HERE / "detection.json", record)
    print("| model | memorized captions (extracted) | score | AUC | TPR at 1% FPR |")
    print("|---|---|---|---|---|")
    for name, row in [*per_model.items(), ("pooled (3 x 80 captions)", pooled_rows)]:
        for key, label in (("first_step", "first step"), ("all_steps", "all 25 steps")):
            if key in row:
                n = row.get("extracted", row[key]["n_pos"])
                print(f"| {name} | {n} of {row.get('prompts', row[key]['n_pos'] + row[key]['n_neg'])} | {label} | "
                      f"{row[key]['auc']:.3f} | {row[key]['tpr_at_1pct']:.3f} |")
    part = per_model["partially memorized"]
    print(f"\npartially memorized: {part['extracted_duplicated']} of {len(dup)} duplicated faces extracted, "
          f"{part['extracted_other']} of {len(train) - len(dup)} others")
    return 0


if __name__ == "__main__":
    sys.exit(main())
