"""Audit cost beside plain sampling: wall time of ``memaudit audit`` / plain diffusers generation of the same images.

Both sides generate the same images (same model, prompts, seeds, scheduler, steps, guidance and batch size) in one
process; each side's time includes loading the model. The audit also computes features, the faiss index, AMD,
the extraction attack's cliques, denoising scores, and writes its JSON, PNGs and HTML report. The order is
diffusers, audit, diffusers, audit, and each side's best time is kept. Target: ratio <= 1.10.

By default the model is the demo's fully fine-tuned Stable Diffusion model audited against its 80 faces.
``--family F`` (one of :data:`memaudit.tiny_families.FAMILY_NAMES`, or ``all``) instead audits that family's tiny
pipeline built in code (saved to a temporary folder; random weights, 32-px images) against 80 seeded random
training images, both sides called with the arguments the family needs (:func:`memaudit.tiny_families.call_kwargs`):
one table row per family.

    python benchmarks/audit_speed.py [--model DIR | --family F|all] [--prompts 20] [--generations 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common
import torch


def plain_diffusers(model: str, prompts: list[str], generations: int, steps: int, guidance: float, batch: int,
                    seed: int, device: str, extra: dict | None = None) -> float:
    from diffusers import DiffusionPipeline

    from memaudit.sampling import image_seed

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(generations)]
    for k in range(0, len(jobs), batch):
        chunk = jobs[k : k + batch]
        gens = [torch.Generator().manual_seed(image_seed(seed, i, j)) for i, j in chunk]
        pipe(prompt=[prompts[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
             generator=gens, output_type="pt", **(extra or {}))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model: str, prompts: list[str], train, generations: int, steps: int, guidance: float, batch_size: int,
            device: str, repeats: int, extra: dict | None = None) -> dict:
    """Time plain diffusers sampling and ``run_audit`` on the same images, alternating, ``repeats`` times each.

    ``train`` is the training dataset the audit compares against. Returns the raw times (``plain_s``, ``audit_s``,
    seconds, in run order), the number of ``images``, the ``ratio`` of the best audit time to the best plain time,
    and the ``seed`` of the generations.
    """
    from memaudit.audit import AuditConfig, run_audit

    cfg = AuditConfig(generations=generations, steps=steps, guidance=guidance, batch_size=batch_size,
                      min_clique=min(5, generations), device=device)
    plain, audit = [], []
    out = Path(tempfile.mkdtemp())
    try:
        for _ in range(repeats):
            plain.append(plain_diffusers(model, prompts, generations, steps, guidance, batch_size, cfg.seed, device,
                                         extra))
            shutil.rmtree(out / "a", ignore_errors=True)
            t0 = time.perf_counter()
            run_audit(model, train, out / "a", prompts=prompts, config=cfg)
            audit.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"images": len(prompts) * generations, "plain_s": plain, "audit_s": audit,
            "ratio": min(audit) / min(plain), "seed": cfg.seed}


def family_case(name: str, folder: Path, n_train: int = 80):
    """Family ``name``'s tiny pipeline saved in ``folder``, 80 seeded random training images at its resolution, and
    the keyword arguments a plain call needs."""
    import numpy as np

    from memaudit.data import from_arrays
    from memaudit.tiny_families import RESOLUTION, call_kwargs, tiny_family

    pipe = tiny_family(name)
    pipe.save_pretrained(folder, safe_serialization=True)
    images = np.random.default_rng(0).random((n_train, RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    train = from_arrays(images, [f"a photo of item {i}" for i in range(n_train)])
    return train, call_kwargs(name)


def main(argv=None) -> int:
    import diffusers

    from memaudit import demo
    from memaudit.tiny_families import FAMILY_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the demo's fine-tuned model)")
    ap.add_argument("--family", default=None, choices=[*FAMILY_NAMES, "all"],
                    help="audit this family's tiny pipeline built in code instead (all: every family)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    rows = []
    families = [] if args.family is None else (list(FAMILY_NAMES) if args.family == "all" else [args.family])
    work = Path(tempfile.mkdtemp())
    try:
        for name in families or [None]:
            if name is None:
                model, train, extra = args.model or str(demo.FULL_FT_MODEL), demo.faces_dataset("train"), {}
                label = Path(model).name
            else:
                model = str(work / name)
                train, extra = family_case(name, Path(model))
                label = f"{name} (tiny)"
            prompts = train.captions[: args.prompts]
            result = measure(model, prompts, train, args.generations, args.steps, args.guidance, args.batch_size,
                             args.device, args.repeats, extra)
            rows.append({"model": label, **result})
            print(f"{label}: plain {min(result['plain_s']):.1f} s, audit {min(result['audit_s']):.1f} s, ratio "
                  f"{result['ratio']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = common.machine(args.device)
    n = rows[0]["images"]
    print(f"machine: {machine}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{n} images per model ({args.prompts} prompts x {args.generations}), {args.steps} steps, batch "
          f"{args.batch_size}; best of {args.repeats}")
    print("| model | plain diffusers sampling, s (best) | memaudit audit, s (best) | all runs (plain; audit) | ratio | "
          "target <= 1.10 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        runs = f"{', '.join(f'{t:.1f}' for t in r['plain_s'])}; {', '.join(f'{t:.1f}' for t in r['audit_s'])}"
        print(f"| {r['model']} | {min(r['plain_s']):.1f} | {min(r['audit_s']):.1f} | {runs} | **{r['ratio']:.2f}** | "
              f"{'met' if r['ratio'] <= 1.10 else 'MISSED'} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "settings": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
