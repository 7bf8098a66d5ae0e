"""MemControl on the bundled faces: the mask search, stage 2 with the chosen mask, and its audit against full
fine-tuning and the method's default (every unit). The table in benchmarks/RESULTS.md, section 7.

Stages (each resumes or is skipped when its output exists under ``--work``):

1. ``memaudit mitigate search`` on the bundled base and the 80 training faces: SV-DIFF at block granularity, NSGA-II
   (population and generations below), each evaluation fine-tuning on a proxy half of the training split for
   ``inner_steps`` steps; memorization = AMD of the proxy captions' generations (negated; the training-time
   denoising strength is confounded on this base, whose digit words pull hard), quality = KID in the
   demo classifier's features on the validation split (16 of the 80 training faces, never trained in the search).
2. Stage 2: the chosen mask and learning rate (the knee point), a second pick from the same front weighted toward
   quality (weights 0.3, 0.7), and the method's default (every unit, learning rate 1e-3), each
   fine-tuned on all 80 faces with the zoo's steps, batch and seed.
3. The demo audit of both, next to full fine-tuning (from ``benchmarks/baselines.py``'s work folder).

    python benchmarks/memcontrol.py [--work benchmarks/zoo] [--smoke]

``--smoke`` runs every stage with tiny settings (a minute or two) to check the pipeline, not to measure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from common import audit_row, machine, markdown_table

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.memcontrol")

FULL = dict(population=8, generations=5, inner_steps=150, steps=3000, audit={})  # ~40 evaluations, ~1 h on 2 cores
QUALITY_PICK = (0.3, 0.7)  # (memorization, quality) weights of the second pick
SMOKE = dict(population=2, generations=1, inner_steps=2, steps=2, audit={"generations": 2, "min_clique": 2, "steps": 2})


def search_config(plan: dict, device: str, **overrides):
    """The search settings of this benchmark (``overrides``: e.g. another schedule, for ``speed.py --part search``)."""
    from memaudit.demo.build import ZooSettings
    from memaudit.mitigate.search import SearchConfig

    zoo = ZooSettings()
    return SearchConfig(method="svdiff", granularity="block", population=plan["population"], memorization="amd",
                        generations=plan["generations"], inner_steps=plan["inner_steps"], batch_size=zoo.ft_batch,
                        quality_features="demo", seed=zoo.seed, device=device, **overrides)


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit, versions
    from memaudit.core.io import atomic_write_bytes, atomic_write_json
    from memaudit.demo.build import ZooSettings
    from memaudit.demo.run import DEMO_SETTINGS
    from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune
    from memaudit.mitigate.finetune import finetune_with_mask
    from memaudit.mitigate.search import OBJECTIVES, EvaluationLog, choose, run_mask_search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "zoo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    plan = SMOKE if args.smoke else FULL
    work = args.work / ("memcontrol-smoke" if args.smoke else "memcontrol")
    zoo = ZooSettings()
    train, heldout = demo.faces_dataset("train"), demo.faces_dataset("heldout")

    search_cfg = search_config(plan, args.device)
    search = run_mask_search(str(demo.BASE_MODEL), train, work / "search", search_cfg,
                             progress=lambda stage, d, t: logger.info("search %s %d/%d", stage, d, t)
                             if stage == "evaluation" else None)
    # the search's cost, from its logs (a rerun reads finished evaluations back instead of running them)
    search_time = sum(r["wall_time_s"] for name in ("evaluations.jsonl", "references.jsonl")
                      for r in EvaluationLog(work / "search" / name).rows)
    # a second pick from the same front, weighted toward quality, to show where the front's other end leads
    quality_pick = choose(search["front"], OBJECTIVES, QUALITY_PICK)
    mask_doc = json.loads((work / "search" / "mask.json").read_text())
    atomic_write_json(work / "search" / "mask_quality.json",
                      {**mask_doc, **{k: quality_pick[k] for k in ("mask", "learning_rate", "objectives",
                                                                   "trainable_parameters", "trainable_percent")},
                       "pick": f"weighted sum {list(QUALITY_PICK)}"})
    if not args.smoke:  # the chosen mask, committed for table.py and transfer.py on machines without the search
        atomic_write_json(HERE / "memcontrol_mask.json", mask_doc)
        atomic_write_bytes(HERE / "memcontrol_pareto.png", (work / "search" / "pareto.png").read_bytes())

    models = {}
    chosen_dir = work / "svdiff_memcontrol"
    if not (chosen_dir / SETTINGS_FILE).is_file():
        finetune_with_mask(str(demo.BASE_MODEL), train, work / "search" / "mask.json", chosen_dir, steps=plan["steps"],
                           batch_size=zoo.ft_batch, seed=zoo.seed, device=args.device)
    models["SV-DIFF, MemControl mask"] = chosen_dir
    quality_dir = work / "svdiff_memcontrol_quality"
    if not (quality_dir / SETTINGS_FILE).is_file():
        finetune_with_mask(str(demo.BASE_MODEL), train, work / "search" / "mask_quality.json", quality_dir,
                           steps=plan["steps"], batch_size=zoo.ft_batch, seed=zoo.seed, device=args.device)
    models[f"SV-DIFF, MemControl mask picked with weights {QUALITY_PICK}"] = quality_dir
    default_dir = work / "svdiff_default"
    if not (default_dir / SETTINGS_FILE).is_file():
        finetune(str(demo.BASE_MODEL), train, default_dir,
                 FinetuneConfig(method="svdiff", steps=plan["steps"], batch_size=zoo.ft_batch, seed=zoo.seed),
                 device=args.device)
    models["SV-DIFF, every unit"] = default_dir
    if (args.work / "full_ft" / SETTINGS_FILE).is_file():
        models["full FT"] = args.work / "full_ft"

    rows = []
    for name, path in models.items():
        out = work / "audits" / path.name
        if (out / "results.json").is_file():
            res = json.loads((out / "results.json").read_text())
        else:
            cfg = AuditConfig(**{**DEMO_SETTINGS, **plan["audit"], "seed": 0, "device": args.device})
            res = run_audit(str(path), train, out, prompts=train.captions, heldout=heldout, config=cfg)
        ft = json.loads((path / SETTINGS_FILE).read_text())
        rows.append({"name": name, **audit_row(res, ft)})
    record = {"command": "python benchmarks/memcontrol.py" + (" --smoke" if args.smoke else ""),
              "machine": machine(args.device), "versions": versions(), "seed": zoo.seed,
              "search_settings": search_cfg.to_dict(), "search_wall_time_s": search_time,
              "search": {k: search[k] for k in ("chosen", "front", "references", "evaluations", "history")},
              "quality_pick": {"weights": list(QUALITY_PICK), "row": quality_pick},
              "rows": rows}
    atomic_write_json(work / "memcontrol.json", record)
    if not args.smoke:
        atomic_write_json(HERE / "memcontrol.json", record)
    print(markdown_table(rows, [("model", "name"), ("trainable %", "trainable"), ("extracted faces (of 80)", "extracted"),
                                ("flagged", "flagged"), ("AMD (pixels)", "amd"), ("own face nearest", "own"),
                                ("denoising", "denoising"), ("KID (demo)", "kid"), ("FID (demo)", "fid"),
                                ("alignment", "alignment")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
