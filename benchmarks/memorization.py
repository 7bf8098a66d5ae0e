"""How often do the bundled models reproduce their training faces? (the numbers in benchmarks/RESULTS.md)

For the base and the full fine-tune, and for the 80 training and 20 held-out captions: 4 generations per caption
through plain ``diffusers.StableDiffusionPipeline`` (the bundled DDIM scheduler, 25 steps, guidance 4), each compared
in pixel space with the 100 faces after their VAE round trip (normalized L2 = pixel RMS in [0, 1]). A face is
reproduced when some generation for its caption has that face as its nearest and lies within the threshold.
Writes ``memorization.json`` and ``memorization_grid.png`` (training face, then its 4 generations from the full
fine-tune, then 4 from the base) and prints a Markdown table.

    python benchmarks/memorization.py [--device cpu|cuda] [--out benchmarks]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.core.io import atomic_write_json
    from memaudit.demo.build import ZooSettings, run_check, versions
    from memaudit.demo.check import DEFAULT_THRESHOLD, save_grid

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--models", type=Path, default=demo.DEMO_DIR, help="folder holding base/ and full_ft/")
    args = ap.parse_args(argv)
    settings = ZooSettings()
    t0 = time.perf_counter()
    scratch = args.out / ".memorization-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results = run_check(args.models, demo.FACES_CSV, settings, args.device, figures=scratch)
    wall = time.perf_counter() - t0
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
               f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    record = {"command": "python benchmarks/memorization.py --device " + args.device, "device": args.device,
              "machine": machine, "versions": versions(), "threshold": DEFAULT_THRESHOLD, "seed": settings.seed,
              "generations": settings.check_generations, "steps": settings.check_steps,
              "guidance": settings.check_guidance, "wall_time_s": wall, "results": results}
    atomic_write_json(args.out / "memorization.json", record)
    ft = torch.load(scratch / "check_full_ft_train.pt", weights_only=True)
    base = torch.load(scratch / "check_base_train.pt", weights_only=True)
    n = settings.check_generations
    # one line per face: the face after the VAE round trip, 4 full-FT generations, 4 base generations
    combined = torch.stack([torch.cat([ft["images"][i * n:(i + 1) * n], base["images"][i * n:(i + 1) * n]])
                            for i in range(len(ft["rows"]))]).flatten(0, 1)
    save_grid(combined, ft["refs"], ft["rows"], args.out / "memorization_grid.png", 2 * n, max_rows=12)
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()
    print(f"machine: {machine}; {wall:.0f} s")
    print("| model | captions | faces reproduced | own face nearest (per generation) | median distance to own face |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        model, split = key.split("/")
        print(f"| {model} | {split} ({r['n_captions']}) | {r['reproduced_faces']} ({r['reproduced_fraction']:.0%}) "
              f"| {r['own_nearest_fraction']:.1%} | {r['median_distance_to_own']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
