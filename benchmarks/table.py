"""Every fine-tuning method, alone and with each baseline, measured the same way: benchmarks/RESULTS.md section 8.

The MemControl paper's comparison on the bundled faces. The bundled base is fine-tuned on the 80 training faces by
freeze (nothing trains: the base itself), full fine-tuning, DiffFit, attention tuning, SV-DIFF (every unit) and
SV-DIFF with the MemControl mask (``--mask``, a ``mask.json`` of ``memaudit mitigate search``; without one, the search
runs first), each with the same steps, batch, seed and caption dropout; the learning rate is each method's default
(full fine-tuning: the zoo's 3e-4; MemControl: the one its search chose). Each model is then audited three times
with the same settings: with no mitigation, with random word addition and with threshold mitigation. By default the
two baselines act at inference time (``--mitigation-stage inference``: RWA in every prompt, the prompt-embedding
optimization), which needs no extra fine-tuning; ``--mitigation-stage training`` fine-tunes every method again with
each baseline instead (three times the training).

Columns: trainable share of the UNet, KID and FID of the held-out captions' generations against the 20 held-out
faces (the bundled classifier's features), AMD (pixels), alignment, flagged prompts, extracted faces, mean denoising
strength, and the fine-tuning wall time.

    python benchmarks/table.py --quick          # about 15 minutes on two CPU cores
    python benchmarks/table.py                  # hours; resumes: rerun the same command after an interruption

``--quick`` trains 300 steps instead of 3,000 and audits with 4 generations per caption, 10 DDIM steps and a clique
of 3 (the full mode uses the demo's audit: 10 generations, 25 steps, clique of 5). Every fine-tune resumes from its
checkpoints and every finished audit is kept, so an interrupted run continues where it stopped. In the full mode a
model already trained with exactly the same settings by ``benchmarks/baselines.py`` or ``benchmarks/memcontrol.py``
(under ``--work``) is reused rather than trained again, and so is an audit of such a model with identical settings. Writes ``table.json`` (``table_quick.json``) and prints the
Markdown table.

``--setting fashion`` builds the same table on the fashion setting (RESULTS.md section 16): the Fashion-MNIST base
fine-tuned on the duplicated product set (each of the 180 products 1 to 32 times) with the bundled full fine-tune's
steps (4,000), batch and seed, by freeze and full fine-tuning (the bundled models), bias, norm, attention tuning,
DiffFit, SV-DIFF, LoRA and the MemControl mask (``memcontrol_mask_fashion.json``; searched on the duplicated set when
absent and kept there, its front as ``memcontrol_pareto_fashion.png``; its inner fine-tune 200 steps, 5% of the full
one's, as faces' 150 of 3,000). Every model is audited on the 180 distinct products, with the 200 held-out products
as reference prompts and quality images (the fashion classifier's features), as ``benchmarks/duplication.py`` audits, whose models and
audits (under ``--work``) are reused. ``--mitigations none`` leaves the baseline columns out. Writes
``table_fashion.json`` and ``worst_fashion.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import audit_row, machine, markdown_table, same_audit_settings

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("benchmarks.table")

# (row name, folder, fine-tune settings); "mask" means: the MemControl mask file's method, mask and learning rate
METHODS = [
    ("freeze", "freeze", {"method": "freeze"}),
    ("full FT", "full_ft", {"method": "full", "learning_rate": 3e-4}),
    ("DiffFit", "difffit", {"method": "difffit"}),
    ("attention tuning", "attention", {"method": "attention"}),
    ("SV-DIFF", "svdiff", {"method": "svdiff"}),
    ("MemControl (SV-DIFF mask)", "memcontrol", "mask"),
]
MITIGATIONS = ("none", "rwa", "threshold")
FULL = dict(steps=3000, audit={}, search=dict(population=8, generations=5, inner_steps=150))
QUICK = dict(steps=300, audit={"generations": 4, "min_clique": 3, "steps": 10},
             search=dict(population=4, generations=2, inner_steps=60))
# the fashion setting: its full fine-tune's learning rate, and the PEFT methods benchmarks/duplication.py trains too
FASHION_METHODS = [
    ("freeze", "freeze", {"method": "freeze"}),
    ("full FT", "full_ft", {"method": "full", "learning_rate": 2e-4}),
    ("bias", "bias", {"method": "bias"}),
    ("norm", "norm", {"method": "norm"}),
    ("attention tuning", "attention", {"method": "attention"}),
    ("DiffFit", "difffit", {"method": "difffit"}),
    ("SV-DIFF", "svdiff", {"method": "svdiff"}),
    ("LoRA", "lora", {"method": "lora"}),
    ("MemControl (SV-DIFF mask)", "memcontrol", "mask"),
]
COMPARED = ("method", "granularity", "mask", "mitigation", "steps", "batch_size", "learning_rate", "seed",
            "caption_dropout", "rwa_words", "rwa_probability", "threshold", "threshold_quantile", "save_dtype")


@dataclass(frozen=True)
class TableSetting:
    """What the table fine-tunes and audits on one bundled setting."""

    name: str
    base: Path
    finetune_set: Callable[[], object]  # what every method fine-tunes on
    audit_set: Callable[[], object]  # the training images the audit checks against, one prompt each
    heldout: Callable[[], object]
    methods: list
    steps: int  # fine-tuning steps of the full mode
    inner_steps: int  # the mask search's inner fine-tune in the full mode: 5% of the steps
    batch: int
    seed: int
    audit: dict  # the full mode's audit settings
    quality_features: str
    default_mask: Path
    noun: str  # what one training image is, for the figure
    # folders under --work's parent where other benchmarks leave models the full mode may reuse, per table folder
    reuse: dict = field(default_factory=dict)
    # where those benchmarks leave their audits; one of the same model with identical settings is reused
    reuse_audits: tuple = ()
    # the bundled models a row without training-time mitigation uses as they are: folder -> (path, fine-tune record)
    bundled: dict = field(default_factory=dict)


def table_setting(name: str) -> TableSetting:
    from memaudit import demo
    from memaudit.demo import fashion
    from memaudit.demo.build import ZooSettings
    from memaudit.demo.build_fashion import FashionSettings
    from memaudit.demo.run import DEMO_SETTINGS
    from memaudit.demo.settings import SETTINGS

    if name == "faces":
        zoo = ZooSettings()
        return TableSetting(
            "faces", demo.BASE_MODEL, lambda: demo.faces_dataset("train"), lambda: demo.faces_dataset("train"),
            lambda: demo.faces_dataset("heldout"), METHODS, FULL["steps"], FULL["search"]["inner_steps"],
            zoo.ft_batch, zoo.seed, DEMO_SETTINGS, "demo", HERE / "memcontrol_mask.json", "face",
            # where benchmarks/baselines.py and benchmarks/memcontrol.py leave models and audits
            reuse={"full_ft": ["full_ft"], "svdiff": ["memcontrol/svdiff_default"],
                   "memcontrol": ["memcontrol/svdiff_memcontrol"]},
            reuse_audits=("audits", "memcontrol/audits"))
    zoo, setting = FashionSettings(), SETTINGS["fashion"]
    info = json.loads((fashion.FASHION_DIR / "build_info.json").read_text())
    full_record = {"trainable_percent": 100.0, "trainable_parameters": info["base"]["unet_params"],
                   "result": {"wall_time_s": info["wall_time_s"]["full_ft"], "steps": zoo.ft_steps}}
    frozen_record = {"trainable_percent": 0.0, "trainable_parameters": 0, "result": {"wall_time_s": 0.0, "steps": 0}}
    return TableSetting(
        "fashion", setting.models["base"], lambda: fashion.products_dataset("train", duplicated=True), setting.train,
        lambda: fashion.products_dataset("heldout"), FASHION_METHODS, zoo.ft_steps, zoo.ft_steps // 20,
        zoo.ft_batch, zoo.seed, setting.audit, "fashion", HERE / "memcontrol_mask_fashion.json", "product",
        # benchmarks/duplication.py --methods trains each PEFT method with the same settings and audits it the same way
        reuse={m: [f"duplication/models/{m}"] for m in ("bias", "norm", "attention", "difffit", "svdiff", "lora")},
        reuse_audits=("duplication/audits",),
        bundled={"freeze": (setting.models["base"], frozen_record), "full_ft": (setting.models["full_ft"], full_record)})


def same_settings(found: dict, wanted: dict) -> bool:
    """Whether a finished fine-tune's recorded settings are ``wanted`` (older records lack granularity and mask)."""
    defaults = {"granularity": "block", "mask": None}
    return all(found.get(k, defaults.get(k)) == wanted.get(k, defaults.get(k)) for k in COMPARED)


def finetune_config(spec, mask_doc: dict | None, steps: int, batch: int, seed: int, mitigation: str):
    from memaudit.finetune import FinetuneConfig

    if spec == "mask":
        spec = {"method": mask_doc["method"], "granularity": mask_doc["granularity"], "mask": mask_doc["mask"],
                "learning_rate": float(mask_doc["learning_rate"])}
    return FinetuneConfig(**spec, steps=steps, batch_size=batch, seed=seed, mitigation=mitigation,
                          checkpoint_every=250)


def trained_model(work: Path, folder: str, cfg, *, reuse: bool, device: str, train, ts: TableSetting) -> Path:
    """The folder of a fine-tune with settings ``cfg``: a bundled model, an existing identical one, or a new one
    trained now."""
    from memaudit.finetune import SETTINGS_FILE, finetune

    if cfg.mitigation == "none" and folder in ts.bundled:
        return ts.bundled[folder][0]
    out = work / folder
    wanted = cfg.to_dict()
    candidates = [out] + ([work.parent / p for p in ts.reuse.get(folder, [])]
                          if reuse and cfg.mitigation == "none" else [])
    for path in candidates:
        settings_file = path / SETTINGS_FILE
        if settings_file.is_file() and same_settings(json.loads(settings_file.read_text())["settings"], wanted):
            return path
    t0 = time.perf_counter()

    def log(step, total, logs):
        if step % 100 == 0 or step == total:
            logger.info("%s %d/%d loss %.4f (%.0f s)", folder, step, total, logs.get("running_loss", float("nan")),
                        time.perf_counter() - t0)

    finetune(str(ts.base), train, out, cfg, device=device, progress=log)
    return out


def reusable_audit(work: Path, model: Path, config, train, heldout, ts: TableSetting) -> Path | None:
    """A finished audit under the setting's ``reuse_audits`` of the same model, training set, held-out set and
    settings."""
    wanted = json.loads(json.dumps(config.to_dict()))  # tuples as the JSON record has them: lists
    for folder in ts.reuse_audits:
        for results in sorted((work.parent / folder).glob("*/results.json")):
            res = json.loads(results.read_text())
            same = (Path(res.get("model", "")).resolve() == model.resolve()
                    and same_audit_settings(res["settings"], wanted)
                    and res.get("train") == train.source and res.get("heldout") == heldout.source
                    and len(res["prompts"]) == len(train.captions))
            if same:
                return results.parent
    return None


def mask_document(path: Path, work: Path, plan: dict, device: str, train, ts: TableSetting,
                  keep: bool = False) -> tuple[dict, str]:
    """The MemControl mask: read from ``path``, or found by a search run now (resumable) under ``work``; with
    ``keep``, a mask found now is copied to ``path`` and the search's front beside it (committed, so that later runs
    and machines without the search read it)."""
    from memaudit.core.io import atomic_write_bytes
    from memaudit.mitigate.finetune import read_mask
    from memaudit.mitigate.search import SearchConfig, run_mask_search

    if path.is_file():
        return read_mask(path), str(path)
    logger.info("no mask at %s: running the mask search under %s", path, work / "search")
    cfg = SearchConfig(method="svdiff", granularity="block", memorization="amd", quality_features=ts.quality_features,
                       batch_size=ts.batch, seed=ts.seed, device=device, **plan["search"])
    run_mask_search(str(ts.base), train, work / "search", cfg)
    found = work / "search" / "mask.json"
    if keep:
        atomic_write_bytes(path, found.read_bytes())
        atomic_write_bytes(path.with_name(path.stem.replace("_mask", "_pareto") + ".png"),
                           (work / "search" / "pareto.png").read_bytes())
        return read_mask(path), str(path)
    return read_mask(found), str(found)


def main(argv=None) -> int:
    from memaudit.audit import AuditConfig, run_audit, versions
    from memaudit.core.io import atomic_write_json
    from memaudit.finetune import SETTINGS_FILE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["faces", "fashion"], default="faces", help="the bundled setting")
    ap.add_argument("--quick", action="store_true", help="300 steps, 4 generations: about 15 minutes on 2 CPU cores")
    ap.add_argument("--work", type=Path, default=HERE / "zoo", help="where models and audits go")
    ap.add_argument("--mask", type=Path, default=None,
                    help="the MemControl mask.json (default memcontrol_mask.json, memcontrol_mask_fashion.json for "
                         "--setting fashion; searched when that is absent)")
    ap.add_argument("--mitigation-stage", choices=["inference", "training"], default="inference")
    ap.add_argument("--mitigations", default=",".join(MITIGATIONS), type=mitigation_list,
                    help="the baselines to measure each method with, comma-separated (none: no baseline)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # 2 steps, 2 generations: checks wiring
    args = ap.parse_args(argv)
    if args.mask is not None and not args.mask.is_file():
        ap.error(f"--mask {args.mask} does not exist; pass a mask.json of memaudit mitigate search, or leave --mask out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    ts = table_setting(args.setting)
    plan = QUICK if args.quick else {**FULL, "steps": ts.steps,
                                     "search": {**FULL["search"], "inner_steps": ts.inner_steps}}
    if args.smoke:
        plan = dict(steps=2, audit={"generations": 2, "min_clique": 2, "steps": 2},
                    search=dict(population=2, generations=1, inner_steps=2, sample_steps=2))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    stem = "table" if ts.name == "faces" else f"table-{ts.name}"
    work = args.work / (stem if mode == "full" else f"{stem}-{mode}")
    if args.mitigation_stage == "training":
        work = work.with_name(work.name + "-training")
    train, audit_set, heldout = ts.finetune_set(), ts.audit_set(), ts.heldout()
    mask_doc, mask_source = mask_document(args.mask or ts.default_mask, work, plan, args.device, train, ts,
                                          keep=mode == "full" and args.mask is None)
    audit_settings = {**ts.audit, **plan["audit"], "seed": ts.seed, "device": args.device}

    rows, t_start = [], time.perf_counter()
    for name, folder, spec in ts.methods:
        for mitigation in args.mitigations:
            train_mit = mitigation if args.mitigation_stage == "training" else "none"
            infer_mit = mitigation if args.mitigation_stage == "inference" else "none"
            cfg = finetune_config(spec, mask_doc, plan["steps"], ts.batch, ts.seed, train_mit)
            model = trained_model(work, folder + ("" if train_mit == "none" else f"_{train_mit}"), cfg,
                                  reuse=mode == "full", device=args.device, train=train, ts=ts)
            out = work / "audits" / f"{model.name}_{mitigation}"
            config = AuditConfig(**{**audit_settings, "mitigation": infer_mit})
            if mode == "full" and not (out / "results.json").is_file():
                out = reusable_audit(work, model, config, audit_set, heldout, ts) or out
            if (out / "results.json").is_file():
                res = json.loads((out / "results.json").read_text())
            else:
                t0 = time.perf_counter()
                res = run_audit(str(model), audit_set, out, prompts=audit_set.captions, heldout=heldout,
                                config=config)
                logger.info("%s / %s audited in %.0f s", name, mitigation, time.perf_counter() - t0)
            bundled = cfg.mitigation == "none" and folder in ts.bundled
            ft = ts.bundled[folder][1] if bundled else json.loads((model / SETTINGS_FILE).read_text())
            rows.append({"name": name, "method": cfg.method, "mitigation": mitigation, "model": str(model),
                         "audit": str(out), "learning_rate": cfg.learning_rate, **audit_row(res, ft)})
    command = "python benchmarks/table.py" + (f" --setting {ts.name}" if ts.name != "faces" else "") + (
        " --quick" if args.quick else "") + (
        f" --mitigation-stage {args.mitigation_stage}" if args.mitigation_stage != "inference" else "") + (
        f" --mitigations {','.join(args.mitigations)}" if args.mitigations != MITIGATIONS else "")
    record = {"command": command, "mode": mode, "mitigation_stage": args.mitigation_stage,
              "machine": machine(args.device), "versions": versions(), "seed": ts.seed,
              "finetune": {"steps": plan["steps"], "batch_size": ts.batch, "caption_dropout": 0.1},
              "audit_settings": audit_settings, "mask": {**mask_doc, "source": mask_source},
              "wall_time_s": time.perf_counter() - t_start, "rows": rows,
              # the work itself, from the records (a rerun reads finished models and audits back)
              "finetune_and_audit_s": sum({r["model"]: r["finetune_wall_time_s"] for r in rows}.values())
              + sum(r["audit_wall_time_s"] for r in rows)}
    if ts.name != "faces":
        record = {"setting": ts.name, **record, "finetune_set": train.source, "audit_set": audit_set.source,
                  "heldout": heldout.source}
    atomic_write_json(work / "table.json", record)
    suffix = ("" if ts.name == "faces" else f"_{ts.name}") + suffix_of(mode)
    if mode != "smoke":
        atomic_write_json(HERE / f"table{suffix}.json", record)
    grid = work / f"worst_{ts.name}.png" if mode == "smoke" else HERE / f"worst_{ts.name}{suffix_of(mode)}.png"
    if "none" in args.mitigations:  # the grid shows the models without mitigation
        worst_grid(record, grid, device=args.device, train=audit_set, noun=ts.noun)
    print(markdown(record))
    return 0


def suffix_of(mode: str) -> str:
    """What an output file's name carries for the mode: nothing for the full mode, else ``_quick`` or ``_smoke``."""
    return "" if mode == "full" else f"_{mode}"


def mitigation_list(value: str) -> tuple[str, ...]:
    """``--mitigations``: some of none, rwa, threshold, in the table's order."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in MITIGATIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: name some of {', '.join(MITIGATIONS)}, comma-separated")
    return tuple(m for m in MITIGATIONS if m in names)


def worst_grid(record: dict, path: Path, per_method: int = 4, device: str = "cpu", train=None,
               noun: str = "face") -> Path:
    """A PNG grid: per method (no mitigation), its generations closest to a training image of ``train`` (default:
    the faces; smallest AMD distance, one per image), each beside that image. The generations are drawn again from
    their recorded seeds."""
    from memaudit import demo
    from memaudit.core.io import atomic_write_bytes
    from memaudit.report import figure_png, new_figure
    from memaudit.sampling import Sampler
    from memaudit.target import load_target

    train = train if train is not None else demo.faces_dataset("train")
    rows = [r for r in record["rows"] if r["mitigation"] == "none"]
    fig = new_figure(2 * per_method * 1.1, len(rows) * 1.25)
    axes = fig.subplots(len(rows), 2 * per_method, squeeze=False)
    for row_axes, r in zip(axes, rows):
        res = json.loads((Path(r["audit"]) / "results.json").read_text())
        images, picked, seen = sorted(res["images"], key=lambda im: im["min_cosine_distance"]), [], set()
        for im in images:
            if im["nearest_train_index"] not in seen:
                seen.add(im["nearest_train_index"])
                picked.append(im)
            if len(picked) == per_method:
                break
        sampler = Sampler(load_target(r["model"], device=device), steps=record["audit_settings"]["steps"],
                          guidance=record["audit_settings"]["guidance"])
        prompts = [res["prompts"][im["prompt_index"]]["prompt"] for im in picked]
        generated = sampler.sample_batch(prompts, [im["seed"] for im in picked])[0]
        for k, im in enumerate(picked):
            for j, (img, title) in enumerate([(generated[k], f"d={im['min_cosine_distance']:.3f}"),
                                              ((train.images[im["nearest_train_index"]] + 1) / 2, "training")]):
                ax = row_axes[2 * k + j]
                ax.imshow(img[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
                ax.set_title(title, fontsize=6)
        row_axes[0].set_ylabel(r["name"].replace(" (SV-DIFF mask)", ""), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"closest generation to a training {noun}, per method (left) and that {noun} (right)", fontsize=8)
    atomic_write_bytes(path, figure_png(fig))
    return path


def markdown(record: dict) -> str:
    features, noun = ("demo", "face") if record.get("setting", "faces") == "faces" else (record["setting"], "product")
    return markdown_table(record["rows"], [
        ("method", "name"), (f"mitigation ({record['mitigation_stage']})", lambda r: r["mitigation"]),
        ("trainable %", "trainable"), (f"KID ({features})", "kid"), (f"FID ({features})", "fid"),
        ("AMD (pixels)", "amd"), (f"own {noun} nearest", lambda r: f"{r['own_nearest']:.1%}"), ("alignment", "alignment"),
        ("flagged prompts", lambda r: f"{r['flagged_prompts']}/{r['prompts']}"), (f"extracted {noun}s", "extracted"),
        ("mean denoising", "denoising"), ("fine-tune wall s", lambda r: f"{r['finetune_wall_time_s']:.0f}")])

if __name__ == "__main__":
    sys.exit(main())
