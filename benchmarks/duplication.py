"""Memorization against duplication on the fashion setting: benchmarks/RESULTS.md section 16.

Each model is audited as ``memaudit demo --setting fashion`` audits (10 generations per product caption, 25 DDIM
steps, guidance 4, a clique of 5 to flag), but on all 180 product captions and with all 200 held-out products (the
demo takes 20) as reference prompts and quality reference, so that KID rests on 2,000 generations against 200
images, grouped by how many copies of the
product the fine-tune set held (1, 2, 4, ... 32). Per group: the share of products extracted (a clique whose
medoid lies within delta of a training image), the share flagged, the mean AMD of the product's generations (pixels;
lower is closer to the training set) and the mean denoising score. Models: the bundled base and full fine-tune, and,
with ``--methods``, the base fine-tuned by each PEFT method on the same duplicated set with the full fine-tune's
steps, batch and seed (the method's own default learning rate).

    python benchmarks/duplication.py                        # base and full_ft (about 20 minutes on 2 CPU cores)
    python benchmarks/duplication.py --heldout-every 10     # the demo's 20 held-out products (half the time)
    python benchmarks/duplication.py --methods freeze,bias,norm,attention,difffit,svdiff,lora   # hours: resumes

Every fine-tune resumes from its checkpoints and every finished audit is kept under ``--work``, so rerunning the
same command after an interruption continues. Writes ``duplication.json`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common import audit_row, machine, markdown_table, same_audit_settings

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.duplication")


def audited(model: Path, out: Path, config, train, heldout) -> dict:
    """The audit of ``model`` in ``out``: read back when finished with the same settings of the same model (its
    files' content digest, kept beside the audit: a rebuilt model in the same folder is audited again), else run
    (resumes)."""
    from memaudit.audit import run_audit
    from memaudit.core.digests import tree_digest
    from memaudit.core.io import atomic_write_json

    results, identity = out / "results.json", out.parent / f"{out.name}.model.json"
    digest = tree_digest(model)
    if results.is_file():
        res = json.loads(results.read_text())
        wanted = json.loads(json.dumps(config.to_dict()))
        same_model = identity.is_file() and json.loads(identity.read_text()).get("digest") == digest
        if same_model and same_audit_settings(res["settings"], wanted, ignore=("device", "workers")):
            return res
        raise SystemExit(f"{out} holds an audit of other settings or of another model (or an unrecorded one); "
                         "move it away or pass another --work.")
    t0 = time.perf_counter()
    res = run_audit(str(model), train, out, prompts=train.captions, heldout=heldout, config=config)
    atomic_write_json(identity, {"model": str(model), "digest": digest})
    logger.info("%s audited in %.0f s", model.name, time.perf_counter() - t0)
    return res


def fine_tuned(method: str, work: Path, device: str) -> Path:
    """The base fine-tuned by ``method`` on the duplicated product set, with the full fine-tune's steps, batch and
    seed (resumes from its checkpoints)."""
    from memaudit.demo import fashion
    from memaudit.demo.build_fashion import FashionSettings
    from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune

    zoo = FashionSettings()
    out = work / "models" / method
    if (out / SETTINGS_FILE).is_file():
        return out
    cfg = FinetuneConfig(method=method, steps=zoo.ft_steps, batch_size=zoo.ft_batch, seed=zoo.seed,
                         checkpoint_every=250, learning_rate=zoo.ft_lr if method == "full" else None)
    t0 = time.perf_counter()

    def log(step, total, logs):
        if step % 100 == 0 or step == total:
            logger.info("%s %d/%d loss %.4f (%.0f s)", method, step, total, logs.get("running_loss", float("nan")),
                        time.perf_counter() - t0)

    finetune(str(fashion.FASHION_DIR / "base"), fashion.products_dataset("train", duplicated=True), out, cfg,
             device=device, progress=log)
    return out


def by_copies(res: dict, copies: dict[str, int]) -> list[dict]:
    """Per duplication level: products, extracted and flagged shares, mean AMD and denoising score."""
    levels = sorted(set(copies.values()))
    rows = []
    for level in levels:
        ps = [p for p in res["prompts"] if copies[p["prompt"]] == level]
        amd = [p["amd_mean"] for p in ps if p.get("amd_mean") is not None]
        rows.append({"copies": level, "products": len(ps), "extracted": sum(p["extracted"] for p in ps),
                     "extracted_fraction": sum(p["extracted"] for p in ps) / len(ps),
                     "flagged_fraction": sum(p["flagged"] for p in ps) / len(ps),
                     "amd": sum(amd) / len(amd) if amd else None,
                     "denoising": sum(p["denoising_score"] for p in ps) / len(ps)})
    return rows


def main(argv=None) -> int:
    from memaudit.audit import AuditConfig
    from memaudit.core.io import atomic_write_json
    from memaudit.core.provenance import versions
    from memaudit.demo import fashion
    from memaudit.demo.settings import SETTINGS
    from memaudit.finetune import SETTINGS_FILE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="", help="PEFT methods to fine-tune and audit too, comma-separated")
    ap.add_argument("--work", type=Path, default=HERE / "zoo" / "duplication", help="where models and audits go")
    ap.add_argument("--heldout-every", type=lambda v: int(v) if v.isdigit() and int(v) > 0 else
                    ap.error(f"--heldout-every {v}: a whole number from 1"), default=1,
                    help="every Nth held-out product is a reference prompt and quality image (1: all 200)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=HERE / "duplication.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    setting = SETTINGS["fashion"]
    train, heldout = setting.train(), fashion.products_dataset("heldout", every=args.heldout_every)
    products = fashion.read_products()
    copies = {str(c): int(k) for c, k, s in zip(products["caption"], products["copies"], products["split"])
              if s == "train"}
    config = AuditConfig(**{**setting.audit, "seed": 0, "device": args.device})
    models = [("base", setting.models["base"]), ("full FT", setting.models["full_ft"])]
    models += [(m, None) for m in filter(None, args.methods.split(","))]
    rows, t_start = [], time.perf_counter()
    for name, path in models:
        path = path or fine_tuned(name, args.work, args.device)
        audits = args.work / ("audits" if args.heldout_every == 1 else f"audits-heldout-every-{args.heldout_every}")
        res = audited(path, audits / name.replace(" ", "_"), config, train, heldout)
        ft = json.loads((path / SETTINGS_FILE).read_text()) if (path / SETTINGS_FILE).is_file() else None
        rows.append({"name": name, "model": str(path), **audit_row(res, ft),
                     "extracted_prompts": res["summary"]["extracted_prompts"],
                     "detection": res["summary"].get("detection"), "by_copies": by_copies(res, copies)})
    flags = (f" --methods {args.methods}" if args.methods else "") + (
        f" --heldout-every {args.heldout_every}" if args.heldout_every != 1 else "")
    record = {"command": "python benchmarks/duplication.py" + flags, "heldout_products": len(heldout),
              "machine": machine(args.device), "versions": versions(), "audit_settings": config.to_dict(),
              "copies": list(fashion.COPIES), "per_level": fashion.PER_LEVEL,
              "wall_time_s": time.perf_counter() - t_start, "rows": rows}
    atomic_write_json(args.out, record)
    print(markdown(record))
    return 0


def markdown(record: dict) -> str:
    """One line per model and duplication level; the totals line per model first."""
    lines = []
    for r in record["rows"]:
        lines.append({"model": r["name"], "copies": "all", "extracted": f"{r['extracted_prompts']}/{r['prompts']}",
                      "AMD": f"{r['amd']:.4f}", "KID": f"{r['kid']:.3f}", "alignment": f"{r['alignment']:.3f}"})
        for lv in r["by_copies"]:
            lines.append({"model": "", "copies": str(lv["copies"]), "extracted": f"{lv['extracted']}/{lv['products']}",
                          "AMD": f"{lv['amd']:.4f}" if lv["amd"] is not None else "—", "KID": "", "alignment": ""})
    columns = [(k, lambda r, k=k: r[k]) for k in ("model", "copies", "extracted", "AMD", "KID", "alignment")]
    return f"Machine: {record['machine']}\n\n" + markdown_table(lines, columns)


if __name__ == "__main__":
    sys.exit(main())
