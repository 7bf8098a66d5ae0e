"""Full fine-tuning against the two baselines, on the bundled faces: the table in benchmarks/RESULTS.md, section 6.

One script, one seed. Stage ``train`` fine-tunes the bundled base on the 80 training faces three times with the zoo's
full fine-tuning settings (3,000 steps, batch 32, learning rate 3e-4, seed 0): plainly, with random word addition
(k=2 tokens, p=0.5, re-drawn every step) and with threshold mitigation ("auto": each batch's top decile of
training-time denoising strength leaves the loss). Each run resumes from its checkpoints if interrupted.

Stage ``audit`` audits each model with the demo's audit settings (80 training captions, 10 generations each,
clique of 5, DDIM 25 steps, guidance 4, pixel features) and the 20 held-out faces for quality (KID and FID of the
held-out captions' generations against the held-out images) and for calibration; and audits the plain full
fine-tune again with each baseline's inference-time form (RWA on every prompt; prompt-embedding optimization).
Writes ``baselines.json`` and prints the Markdown table.

    python benchmarks/baselines.py [--stage train|audit|all] [--work benchmarks/zoo] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = {"full_ft": "none", "full_ft_rwa": "rwa", "full_ft_threshold": "threshold"}
logger = logging.getLogger("benchmarks.baselines")


def train_stage(work: Path, device: str) -> dict:
    from memaudit import demo
    from memaudit.demo.build import ZooSettings
    from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune

    zoo = ZooSettings()
    train = demo.faces_dataset("train")
    done = {}
    for name, mitigation in VARIANTS.items():
        out = work / name
        if not (out / SETTINGS_FILE).is_file():
            cfg = FinetuneConfig(mitigation=mitigation, steps=zoo.ft_steps, batch_size=zoo.ft_batch,
                                 learning_rate=zoo.ft_lr, seed=zoo.seed, checkpoint_every=250)
            t0 = time.perf_counter()

            def log(step, total, logs, name=name, t0=t0):
                if step % 250 == 0 or step == total:
                    logger.info("%s %d/%d loss %.4f (%.0f s)", name, step, total,
                                logs.get("running_loss", float("nan")), time.perf_counter() - t0)

            finetune(str(demo.BASE_MODEL), train, out, cfg, device=device, progress=log)
        done[name] = json.loads((out / SETTINGS_FILE).read_text())
    return done


AUDITS = [  # (row name, model, training-time mitigation, inference-time mitigation)
    ("full FT", "full_ft", "none", "none"),
    ("full FT + RWA (training)", "full_ft_rwa", "rwa", "none"),
    ("full FT + threshold (training)", "full_ft_threshold", "threshold", "none"),
    ("full FT + RWA (inference)", "full_ft", "none", "rwa"),
    ("full FT + threshold (inference)", "full_ft", "none", "threshold"),
]


def audit_stage(work: Path, device: str, trained: dict) -> dict:
    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit, versions
    from memaudit.demo.run import DEMO_SETTINGS

    train, heldout = demo.faces_dataset("train"), demo.faces_dataset("heldout")
    rows = []
    for name, model, train_mit, infer_mit in AUDITS:
        out = work / "audits" / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        results_file = out / "results.json"
        if results_file.is_file():
            res = json.loads(results_file.read_text())
        else:
            cfg = AuditConfig(**{**DEMO_SETTINGS, "seed": 0, "device": device, "mitigation": infer_mit})
            t0 = time.perf_counter()
            res = run_audit(str(work / model), train, out, prompts=train.captions, heldout=heldout, config=cfg)
            logger.info("%s audited in %.0f s", name, time.perf_counter() - t0)
        s, ft = res["summary"], trained[model]
        own = [p["own_train_index"] for p in res["prompts"]]
        own_nearest = sum(own[im["prompt_index"]] == im["nearest_train_index"] for im in res["images"]) / len(res["images"])
        rows.append({"own_face_nearest": own_nearest, "name": name, "model": model, "training_mitigation": train_mit, "inference_mitigation": infer_mit,
                     "flagged_prompts": s["flagged_prompts"], "extracted_training_images": s["extracted_training_images"],
                     "amd": s["amd"], "denoising_mean": s["denoising_mean"], "kid": s["quality"]["kid"],
                     "kid_std": s["quality"]["kid_std"], "fid": s["quality"]["fid"],
                     "alignment": s["alignment"]["mean"], "alignment_heldout": s["alignment"].get("reference_mean"),
                     "finetune_wall_time_s": ft["result"]["wall_time_s"], "finetune_stats": ft["result"]["stats"],
                     "finetune_skipped_steps": ft["result"]["skipped_steps"],
                     "mean_loss_last_100": ft["result"]["mean_loss_last_100"],
                     "mitigation": s.get("mitigation"), "audit_wall_time_s": s["wall_time_s"]})
    return {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads" if device == "cpu"
            else torch.cuda.get_device_name(), "device": device, "versions": versions(), "seed": 0,
            "finetune_settings": {k: v for k, v in trained["full_ft"]["settings"].items() if k != "mitigation"},
            "audit_settings": {**DEMO_SETTINGS, "seed": 0}, "rows": rows}


def markdown(record: dict) -> str:
    lines = ["| model | extracted faces (of 80) | flagged prompts | AMD (pixels) | own face nearest | "
             "mean denoising strength | KID (demo features) | FID (demo features) | alignment | mitigation did |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['name']} | **{r['extracted_training_images']}** | {r['flagged_prompts']} | {r['amd']:.4f} | "
                     f"{100 * r['own_face_nearest']:.0f}% | {r['denoising_mean']:.3f} | {r['kid']:.3f} ± "
                     f"{r['kid_std']:.3f} | {r['fid']:.2f} | {r['alignment']:.3f} | {_did(r)} |")
    return "\n".join(lines)


def _did(r: dict) -> str:
    stats, m = r["finetune_stats"], r.get("mitigation") or {}
    if r["inference_mitigation"] == "rwa":
        return f"{m.get('rwa_words')} random tokens in every prompt, drawn per image"
    if r["inference_mitigation"] == "threshold":
        return (f"first-step norm {m['first_step_norm_before_mean']:.2f} -> {m['first_step_norm_after_mean']:.2f} "
                f"(target {m['norm_target']:.2f}), {m['optimizer_steps_mean']:.1f} AdamW steps per batch")
    if "rwa_perturbed" in stats:
        return f"{stats['rwa_perturbed']:,} captions perturbed in training"
    if "threshold_dropped" in stats:
        return (f"{stats['threshold_dropped']:,} of {stats['threshold_seen']:,} samples dropped, "
                f"{r['finetune_skipped_steps']} steps skipped")
    return "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["train", "audit", "all"], default="all")
    ap.add_argument("--work", type=Path, default=HERE / "zoo", help="where the fine-tuned models and audits go")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    trained = train_stage(args.work, args.device)
    for name, s in trained.items():
        logger.info("%s: %d steps, %.0f s, stats %s", name, s["result"]["steps"], s["result"]["wall_time_s"],
                    s["result"]["stats"])
    if args.stage == "train":
        return 0
    record = audit_stage(args.work, args.device, trained)
    record["command"] = "python benchmarks/baselines.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    from memaudit.core.io import atomic_write_json

    atomic_write_json(HERE / "baselines.json", record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
