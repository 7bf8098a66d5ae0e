"""Audit cost beside plain sampling: wall time of ``memaudit audit`` / plain diffusers generation of the same images.

Both sides generate the same images (same model, prompts, seeds, scheduler, steps, guidance and batch size) in one
process; each side's time includes loading the model. The audit also computes features, the faiss index, AMD,
the extraction attack's cliques, denoising scores, and writes its JSON, PNGs and HTML report. The order is
diffusers, audit, diffusers, audit, and each side's best time is kept. Target: ratio <= 1.10.

    python benchmarks/audit_speed.py [--model DIR] [--prompts 20] [--generations 10] [--device cpu]
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
                    seed: int, device: str) -> float:
    from diffusers import StableDiffusionPipeline

    from memaudit.sampling import image_seed

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(generations)]
    for k in range(0, len(jobs), batch):
        chunk = jobs[k : k + batch]
        gens = [torch.Generator().manual_seed(image_seed(seed, i, j)) for i, j in chunk]
        pipe(prompt=[prompts[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
             generator=gens, output_type="pt")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model: str, prompts: list[str], train, generations: int, steps: int, guidance: float, batch_size: int,
            device: str, repeats: int) -> dict:
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
            plain.append(plain_diffusers(model, prompts, generations, steps, guidance, batch_size, cfg.seed, device))
            shutil.rmtree(out / "a", ignore_errors=True)
            t0 = time.perf_counter()
            run_audit(model, train, out / "a", prompts=prompts, config=cfg)
            audit.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"images": len(prompts) * generations, "plain_s": plain, "audit_s": audit,
            "ratio": min(audit) / min(plain), "seed": cfg.seed}


def main(argv=None) -> int:
    import diffusers

    from memaudit import demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(demo.FULL_FT_MODEL))
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
    train = demo.faces_dataset("train")
    prompts = train.captions[: args.prompts]
    result = measure(args.model, prompts, train, args.generations, args.steps, args.guidance, args.batch_size,
                     args.device, args.repeats)
    plain, audit, ratio, n = result["plain_s"], result["audit_s"], result["ratio"], result["images"]
    machine = common.machine(args.device)
    print(f"machine: {machine}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"{n} images ({len(prompts)} prompts x {args.generations}), {args.steps} steps, batch {args.batch_size}; "
          f"best of {args.repeats}")
    print("| side | wall s (best) | all runs | ratio |")
    print("|---|---|---|---|")
    print(f"| plain diffusers sampling | {min(plain):.1f} | {', '.join(f'{t:.1f}' for t in plain)} | 1.00 |")
    print(f"| memaudit audit | {min(audit):.1f} | {', '.join(f'{t:.1f}' for t in audit)} | **{ratio:.2f}** |")
    print(f"target <= 1.10: {'met' if ratio <= 1.10 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "images": n, "plain_s": plain, "audit_s": audit,
                                         "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
