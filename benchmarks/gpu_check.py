"""GPU checks of target loading and training (run where a CUDA GPU is available).

For a pipeline folder: loads it on CUDA in float32, float16 and bfloat16 and compares the eps predictions with
float32 on the CPU; checks that seeded generation gives the same images on CPU and CUDA (CPU generators); trains
a few steps with mixed precision fp16 and bf16 and checks that the loss falls. Prints a table.

    python benchmarks/gpu_check.py MODEL_DIR --train faces
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.target import load_target
    from memaudit.training import TrainConfig, train_unet

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    rows = []
    g = torch.Generator().manual_seed(0)
    ref = load_target(args.model, device="cpu")
    x = torch.randn(8, *ref.latent_shape, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    prompts = [r["caption"] for r in demo.read_faces_csv()[:8]]
    eps_ref = ref.predict_eps(x, t, ref.encode_prompts(prompts))
    for dtype in ("float32", "float16", "bfloat16"):
        tg = load_target(args.model, device="cuda", dtype=dtype)
        with torch.no_grad():
            eps = tg.predict_eps(x.cuda(), t.cuda(), tg.encode_prompts(prompts)).cpu()
        torch.cuda.synchronize()
        err = float((eps - eps_ref).norm() / eps_ref.norm())
        rows.append({"check": f"eps on cuda/{dtype} vs cpu/float32", "value": err, "ok": err < (1e-3 if dtype == "float32" else 5e-2)})
    # same images on CPU and CUDA for a seed
    from memaudit.demo.check import generate

    imgs = {}
    for dev in ("cpu", "cuda"):
        tg = load_target(args.model, device=dev)
        pipe = tg.pipeline()
        pipe.set_progress_bar_config(disable=True)
        imgs[dev] = generate(pipe, prompts[:4], 1, 25, 4.0, seed=0)
    diff = float((imgs["cpu"] - imgs["cuda"]).abs().max())
    rows.append({"check": "max |image cpu - image cuda|, same seeds (pixels in [0,1])", "value": diff, "ok": diff < 0.05})
    train = demo.faces_dataset("train")
    from memaudit.training import autocast

    for mp in ("fp16", "bf16", "no"):
        tg = load_target(args.model, device="cuda")
        cfg = TrainConfig(steps=60, batch_size=32, learning_rate=1e-4, mixed_precision=mp, seed=0)
        with torch.no_grad(), autocast(cfg, tg.device):
            out_dtype = tg.unet(x.cuda(), t.cuda(), encoder_hidden_states=tg.encode_prompts(prompts)).sample.dtype
        res = train_unet(tg, train, cfg)
        first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
        rows.append({"check": f"train 60 steps mixed_precision={mp} (UNet output {str(out_dtype).split('.')[-1]}, "
                              f"{1000 * res.wall_time_s / 60:.0f} ms/step): loss first10 -> last10",
                     "value": f"{first:.6f} -> {last:.6f}",
                     "ok": all(v == v for v in res.losses) and last < first * 1.5})
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| check | value | ok |\n|---|---|---|")
    for r in rows:
        v = r["value"] if isinstance(r["value"], str) else f"{r['value']:.2e}"
        print(f"| {r['check']} | {v} | {'yes' if r['ok'] else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
