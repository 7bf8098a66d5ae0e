"""Per-step CPU time of each zoo stage, and the projected wall time of the whole build.

Runs a few steps of each stage of ``python -m memaudit.demo.build`` with the same modules, batch sizes and
settings (after warm-up steps), multiplies by the configured step counts, and prints a table with the machine.
A full CPU build takes about an hour; this measures its cost in about a minute.

    python benchmarks/zoo_speed.py [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch


def _timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.data import from_arrays
    from memaudit.demo.build import ZooSettings, all_words
    from memaudit.models import ModelSpec, build_pipeline
    from memaudit.target import from_pipeline
    from memaudit.training import TrainConfig, VAEConfig, train_unet, train_vae

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    s = ZooSettings()
    spec = ModelSpec(**s.spec)
    pipe = build_pipeline(spec, words=all_words(), seed=0)
    mnist, labels = demo.mnist_images()
    faces = demo.faces_dataset("train")
    rows = []

    def vae_step():
        train_vae(pipe.vae, mnist[:512], VAEConfig(steps=1, batch_size=s.vae_batch, learning_rate=s.vae_lr))

    rows.append(("VAE", s.vae_batch, _timed(vae_step, args.steps), s.vae_steps))
    target = from_pipeline(pipe, device="cpu")
    digits = from_arrays((mnist[:512] + 1) / 2, [demo.digit_caption(d) for d in labels[:512]])
    n = args.steps + 2
    for name, data, batch, te, total in (("base (UNet + text encoder)", digits, s.base_batch, True, s.base_steps),
                                         ("full fine-tune", faces, s.ft_batch, False, s.ft_steps)):
        cfg = TrainConfig(steps=n, batch_size=batch, learning_rate=1e-4, train_text_encoder=te, log_every=0)
        times = []
        train_unet(target, data, cfg, progress=lambda *_, t=times: t.append(time.perf_counter()))
        per_step = (times[-1] - times[1]) / (len(times) - 2)
        rows.append((name, batch, per_step, total))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"machine: {machine}; torch {torch.__version__}")
    print("| stage | batch | s/step (measured) | steps | projected s |")
    print("|---|---|---|---|---|")
    total = 0.0
    for name, batch, per, steps in rows:
        total += per * steps
        print(f"| {name} | {batch} | {per:.3f} | {steps} | {per * steps:.0f} |")
    print(f"| **total (training only)** | | | | **{total:.0f} ({total / 60:.1f} min)** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
