"""Every memorization detector side by side, in one sampling pass: benchmarks/RESULTS.md section 18.

Two partly memorizing models, labels from the extraction attack (a caption is memorized when its clique's medoid
matches a training image):

* ``fashion``: the bundled fashion full fine-tune on the duplicated set (products seen 1 to 32 times), labels from
  ``benchmarks/duplication.py``'s audit (180 trained product captions); the 200 held-out product captions are the
  reference prompts (never trained on).
* ``faces``: ``benchmarks/detection.py``'s partially memorized fine-tune (8 of 80 faces repeated 25 times), labels
  from its audit (80 trained captions); the 20 held-out faces' captions are the reference prompts.

Each caption is sampled once with every detector (``--detectors all``): 4 generations, the audit's initial latents
for trained captions and the reference seed stream for held-out ones, the setting's audit sampler (DDIM 25 steps,
guidance 4). Per detector: AUC and TPR at 1% FPR from 1 generation and from the mean of 4 (the columns of Jeon et
al.'s Table 1), against two negative sets (the held-out captions, as the papers; every caption not extracted, the
practical question); its extra denoiser evaluations per image; its wall time per caption, measured side by side on
the first 16 trained captions (1 generation): the pass without detectors, with the free ones, and with each paid one
alone. A combined score (each detector standardized on the held-out captions' scores alone, then the mean of the
standardized free first-step scores; never fitted to the labels). The triage: score every trained caption with a
first-step detector (1 generation), attack the highest-scoring ones first, count the extracted captions found against
the denoiser calls spent (a guided call counted once, as in ``speed.py --part triage``; scoring included).

    python benchmarks/duplication.py     # fashion labels (resumes)
    python benchmarks/detection.py       # faces labels and the partial model (resumes)
    python benchmarks/detectors.py [--settings fashion,faces]   # about 15 minutes on 2 CPU cores

Writes ``detectors.json`` and ``roc_detectors.png``.
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
from memaudit.core.io import atomic_write_json
from memaudit.core.provenance import versions
from memaudit.demo.settings import SETTINGS
from memaudit.detectors import available, default_names, get_detector
from memaudit.metrics.detection import DetectionSummary, plot_roc, summarize
from memaudit.sampling import Sampler
from memaudit.target import load_target

HERE = Path(__file__).resolve().parent
GENERATIONS = 4
TIMED_PROMPTS = 16
#: first-step detectors (their score needs only the first step: the triage's candidates)
FIRST_STEP = ("wen_first", "anisotropy_first", "memattn", "anisotropy", "sharpness")
TRIAGE_FRACTIONS = tuple(round(0.05 * k, 2) for k in range(1, 21))
logger = logging.getLogger("benchmarks.detectors")


def labelled(setting: str, zoo: Path, device: str) -> dict:
    """The model, its trained captions with their extraction labels, and the held-out captions of ``setting``."""
    if setting == "fashion":
        from memaudit.demo import fashion

        audit = zoo / "duplication" / "audits" / "full_FT" / "results.json"
        if not audit.is_file():
            raise SystemExit(f"{audit} is missing: run python benchmarks/duplication.py first.")
        res = json.loads(audit.read_text())
        model, held = SETTINGS["fashion"].models["full_ft"], fashion.products_dataset("heldout").captions
    else:
        from detection import audit as faces_audit
        from detection import partial_model

        from memaudit import demo

        model, _ = partial_model(zoo / "detection", device)
        audit = zoo / "detection" / "audits" / model.name / "results.json"
        res = faces_audit(model, audit.parent, device)
        held = demo.faces_dataset("heldout").captions
    return {"model": model, "audit": audit, "trained": [p["prompt"] for p in res["prompts"]],
            "extracted": np.array([int(p["extracted"]) for p in res["prompts"]]), "heldout": list(held),
            "audit_generations": res["summary"]["generations_per_prompt"], "audit_settings": res["settings"]}


@torch.no_grad()
def detector_scores(target, prompts: list[str], config: AuditConfig, seed: int) -> dict[str, np.ndarray]:
    """``{name: [len(prompts), GENERATIONS]}`` every detector's per-image scores, from one sampling pass."""
    sampler = Sampler(target, steps=config.steps, guidance=config.guidance, batch_size=config.batch_size, seed=seed,
                      detectors=available())
    out = {name: np.full((len(prompts), GENERATIONS), np.nan) for name in available()}
    for batch in sampler.run(prompts, GENERATIONS):
        for name, values in batch.detectors.items():
            out[name][batch.prompt_index.numpy(), batch.generation.numpy()] = values.numpy()
    return out


@torch.no_grad()
def timed(target, prompts: list[str], config: AuditConfig) -> dict[str, float]:
    """Seconds per caption (1 generation) of the pass without detectors, with the free ones, and with each paid one
    alone, measured one after the other in this process (a warm-up pass first)."""
    runs = {"none": [], "default (free)": default_names(),
            **{name: [name] for name in available() if not get_detector(name).free()}}
    out = {}
    for label, names in [("warm-up", []), *runs.items()]:
        sampler = Sampler(target, steps=config.steps, guidance=config.guidance, batch_size=TIMED_PROMPTS,
                          seed=config.seed, detectors=names)
        t0 = time.perf_counter()
        for _ in sampler.run(prompts, 1):
            pass
        out[label] = (time.perf_counter() - t0) / len(prompts)
    out.pop("warm-up")
    return out


def per_prompt(scores: np.ndarray, generations: int) -> np.ndarray:
    return scores[:, :generations].mean(1)


def combined(train: dict[str, np.ndarray], held: dict[str, np.ndarray], names: list[str]) -> tuple[np.ndarray, ...]:
    """The mean of ``names``' scores standardized by the held-out captions' mean and standard deviation (per image;
    the reference prompts alone set the scale, no label is used)."""
    def z(name, s):
        ref = held[name]
        return (s - ref.mean()) / (ref.std() or 1.0)

    return (np.mean([z(n, train[n]) for n in names], axis=0), np.mean([z(n, held[n]) for n in names], axis=0))


def triage(score: np.ndarray, extracted: np.ndarray, score_calls: float, attack_calls: int) -> list[dict]:
    """Attack the highest-scoring share of the trained captions: extracted found and calls spent (shares)."""
    order = np.argsort(-score, kind="stable")
    n, total = len(score), int(extracted.sum())
    rows = []
    for fraction in TRIAGE_FRACTIONS:
        k = int(np.ceil(fraction * n))
        spent = n * score_calls + k * attack_calls
        rows.append({"fraction": fraction, "prompts": k, "found": int(extracted[order[:k]].sum()),
                     "found_share": float(extracted[order[:k]].sum() / total) if total else float("nan"),
                     "calls_share": spent / (n * attack_calls)})
    return rows


def evaluate(setting: str, zoo: Path, device: str) -> tuple[dict, dict]:
    data = labelled(setting, zoo, device)
    config = AuditConfig(**{**SETTINGS[setting].audit, "seed": 0, "device": device})
    target = load_target(str(data["model"]), device=device)
    t0 = time.perf_counter()
    s_train = detector_scores(target, data["trained"], config, config.seed)
    s_held = detector_scores(target, data["heldout"], config, reference_seed(config))
    wall = time.perf_counter() - t0
    names = available()
    free_first = [n for n in FIRST_STEP if get_detector(n).free()]
    c_train, c_held = combined(s_train, s_held, free_first)
    s_train["combined (free, first step)"], s_held["combined (free, first step)"] = c_train, c_held
    extracted = data["extracted"]
    table, curves = {}, {}
    for name in s_train:
        for gens in (1, GENERATIONS):
            pos, tr, he = extracted == 1, per_prompt(s_train[name], gens), per_prompt(s_held[name], gens)
            if not np.isfinite(np.concatenate([tr, he])).all():
                continue  # the detector does not read this family
            for neg, (train_keep, label) in {"held-out": (pos, extracted[pos]),
                                              "not extracted": (np.ones_like(pos), extracted)}.items():
                s = summarize(np.concatenate([tr[train_keep], he]), np.concatenate([label, np.zeros(len(he), int)]))
                # the ROC's points are left out of the record: the scores below give them again
                table[f"{name} | {gens} gen | {neg}"] = {k: v for k, v in s.to_dict().items() if k not in ("fpr", "tpr")}
                if gens == GENERATIONS and neg == "held-out":
                    curves[f"{setting}: {name}"] = DetectionSummary(**s.to_dict())
    attack_calls = data["audit_generations"] * config.steps
    triaged = {name: triage(per_prompt(s_train[name], 1), extracted,
                            1 + get_detector(name).extra_calls / 2, attack_calls)
               for name in FIRST_STEP if np.isfinite(s_train[name]).all()}
    costs = timed(target, data["trained"][:TIMED_PROMPTS], config)
    record = {"model": str(data["model"]), "labels": str(data["audit"]), "positives": int(extracted.sum()),
              "trained": len(extracted), "heldout": len(data["heldout"]), "generations": GENERATIONS,
              "audit_settings": data["audit_settings"], "sampling_wall_time_s": wall, "detection": table,
              "extra_calls_per_image": {n: get_detector(n).extra_calls for n in names},
              "seconds_per_caption": costs, "timed_captions": TIMED_PROMPTS, "triage": triaged,
              "scores": {"trained": {k: v.tolist() for k, v in s_train.items()},
                         "heldout": {k: v.tolist() for k, v in s_held.items()}, "extracted": extracted.tolist()}}
    return record, curves


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="fashion,faces")
    ap.add_argument("--zoo", type=Path, default=HERE / "zoo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out, curves = {}, {}
    for setting in args.settings.split(","):
        out[setting], c = evaluate(setting, args.zoo, args.device)
        curves.update(c)
    plot_roc(curves, HERE / "roc_detectors.png")
    record = {"command": "python benchmarks/detectors.py --settings " + args.settings, "machine": machine(args.device),
              "versions": versions(), "settings": out}
    path = HERE / "detectors.json"
    if path.is_file() and args.settings != "fashion,faces":  # keep the other setting's rows
        earlier = json.loads(path.read_text()).get("settings", {})
        record["settings"] = {**{k: v for k, v in earlier.items() if k not in out}, **out}
    atomic_write_json(path, record)
    print(f"Machine: {record['machine']}\n")
    for setting, r in out.items():
        print(f"## {setting}: {r['positives']} of {r['trained']} trained captions extracted, {r['heldout']} held-out\n")
        print("| detector | extra evals / image | s / caption (ratio to none) | AUC 1 gen | TPR@1% 1 gen | AUC 4 gens "
              "| TPR@1% 4 gens | AUC 4 gens, vs not extracted |")
        print("|---|---|---|---|---|---|---|---|")
        base = r["seconds_per_caption"]["none"]
        for name in r["scores"]["trained"]:
            rows = {k.split(" | ", 1)[1]: v for k, v in r["detection"].items() if k.split(" | ")[0] == name}
            if not rows:
                print(f"| {name} | | | not read on this family | | | | |")
                continue
            cost = r["seconds_per_caption"].get(name, r["seconds_per_caption"]["default (free)"])
            one, four = rows["1 gen | held-out"], rows[f"{GENERATIONS} gen | held-out"]
            print(f"| {name} | {r['extra_calls_per_image'].get(name, '-')} | {cost:.3f} ({cost / base:.2f}) | "
                  f"{one['auc']:.3f} | {one['tpr_at_1pct']:.3f} | {four['auc']:.3f} | {four['tpr_at_1pct']:.3f} | "
                  f"{rows[f'{GENERATIONS} gen | not extracted']['auc']:.3f} |")
        print("\n| detector (1 gen, first step) | attacked | extracted found | calls spent (of the full attack) |")
        print("|---|---|---|---|")
        for name, rows in r["triage"].items():
            for row in rows:
                if row["fraction"] in (0.1, 0.2, 0.5):
                    print(f"| {name} | {row['prompts']} | {row['found']} ({row['found_share']:.0%}) | "
                          f"{row['calls_share']:.1%} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
