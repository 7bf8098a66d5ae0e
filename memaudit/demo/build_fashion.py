"""Build the ``fashion`` setting (``python -m memaudit.demo.build --setting fashion``): see
:mod:`memaudit.demo.fashion` for what it is. Stages, each skipped when its output exists (an interrupted build
resumes):

1. ``products.npz``: the fine-tune and held-out products, chosen by seed from Fashion-MNIST's test split.
2. VAE (32x32 grayscale -> 8x8x4 latents) on the 60,000 training images (never a product).
3. Base: CLIP text encoder and UNet trained together from scratch on the training images, captioned by class and
   a product number whose digits describe the image (:func:`base_captions`). Saved in float16 (``base/``).
4. Full fine-tune: the saved base, reloaded, every UNet parameter tuned on the duplicated product set (text encoder
   and VAE frozen). Saved in float16 (``full_ft/``).
5. The setting's classifier (:mod:`memaudit.demo.fashion_scorer`).
6. The reproduction check, per duplication level, of both models.

Everything is seeded; ``build_info.json`` records settings, losses, versions, the machine and wall times. Base and
fine-tune write a checkpoint every 250 steps in the work folder, so a build stopped mid-stage continues there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from memaudit.core.io import atomic_write_json
from memaudit.core.provenance import machine, versions
from memaudit.data import from_arrays
from memaudit.demo import fashion
from memaudit.demo.check import reproduction_check
from memaudit.demo.fashion_scorer import train_fashion_classifier
from memaudit.demo.scorer import save_classifier
from memaudit.demo.stages import TrainLog, model_spec
from memaudit.models import ModelSpec, build_pipeline, count_parameters
from memaudit.target import from_pipeline, load_target
from memaudit.training import RunClock, TrainConfig, VAEConfig, latest_checkpoint, train_denoiser, train_vae

logger = logging.getLogger("memaudit.demo.build")
#: what the number in a base caption is (:func:`base_captions`)
BASE_NUMBERS = ("class", "random", "attributes")
#: base and fine-tune write a resumable checkpoint (in the work folder) this often: a build stopped mid-stage
#: continues from the latest one, to the same weights
CHECKPOINT_EVERY = 250


@dataclass
class FashionSettings:
    seed: int = 0
    vae_steps: int = 1000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    base_steps: int = 4000
    base_batch: int = 64
    base_lr: float = 3e-4
    ft_steps: int = 4000
    ft_batch: int = 32
    ft_lr: float = 2e-4
    scorer_steps: int = 3000
    check_generations: int = 4
    check_steps: int = 25
    check_guidance: float = 4.0
    #: what the number in a base caption is (:func:`base_captions`). "random" numbers taught the first build's text
    #: encoder to wash numbers out, and "class" (none) left number words unlearned, so that both fine-tunes could not
    #: tell products apart (RESULTS.md 16); "attributes" makes number words meaningful, as digit words are to the
    #: faces base
    base_numbers: str = "attributes"
    spec: dict = field(default_factory=model_spec)


class _Stage:
    """Run a stage once: skipped when its output exists; its info and wall time recorded in build_info.json."""

    def __init__(self, info: dict, path: Path):
        self.info, self.path = info, path

    def __call__(self, name: str, done: Path, fn: Callable[[], dict]) -> None:
        if done.exists():
            return
        t0 = time.perf_counter()
        self.info[name] = fn()
        self.info["wall_time_s"][name] = time.perf_counter() - t0
        atomic_write_json(self.path, self.info)


def settings_problem(settings: FashionSettings) -> str | None:
    """What is wrong with ``settings``, in one line (None: nothing), checked before any work."""
    if settings.base_numbers not in BASE_NUMBERS:
        return f"base_numbers={settings.base_numbers}: use one of {', '.join(BASE_NUMBERS)}"
    return None


def build_fashion(work: Path, out: Path, settings: FashionSettings, source: Path = fashion.SOURCE_DIR,
                  device: str = "cpu", check: bool = True) -> dict:
    """Build (or resume building) the fashion setting into ``out`` (``base/``, ``full_ft/``, ``products.npz``,
    ``scorer.safetensors``, ``build_info.json``), with scratch files in ``work``."""
    if problem := settings_problem(settings):
        raise ValueError(problem)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    info_path = work / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update({"setting": "fashion", "settings": asdict(settings), "source": str(source),
                 "versions": versions(faiss=False), "device": device, "machine": machine(device)})
    info.setdefault("wall_time_s", {})
    stage = _Stage(info, info_path)
    spec = ModelSpec(**settings.spec)
    train_x, train_y = fashion.source_split("train", source)
    products = out / "products.npz"
    stage("products", products, lambda: _products(products, source, settings))
    vae_dir = work / "vae"
    stage("vae", vae_dir / "config.json", lambda: _vae(vae_dir, train_x, products, spec, settings, device))
    base_dir = out / "base"
    stage("base", base_dir / "model_index.json",
          lambda: _base(base_dir, vae_dir, train_x, train_y, spec, settings, device, work / "base-checkpoints"))
    ft_dir = out / "full_ft"
    stage("full_ft", ft_dir / "model_index.json",
          lambda: _full_ft(ft_dir, base_dir, products, settings, device, work / "full_ft-checkpoints"))
    scorer = out / "scorer.safetensors"
    stage("scorer", scorer, lambda: _scorer(scorer, base_dir, train_x, train_y, settings))
    if check:
        stage("check", work / "check.json", lambda: run_fashion_check(out, settings, device, work / "check.json"))
    info["wall_time_s"]["total"] = sum(v for k, v in info["wall_time_s"].items() if k != "total")
    atomic_write_json(info_path, info)
    atomic_write_json(out / "build_info.json", info)
    return info


def _products(path: Path, source: Path, settings: FashionSettings) -> dict:
    """Stage 1: the products, from the test split."""
    images, labels = fashion.source_split("t10k", source)
    recipe = fashion.write_products(path, images, labels, settings.seed)
    return {"train_products": int((recipe["split"] == "train").sum()), "copies": list(fashion.COPIES),
            "per_level": fashion.PER_LEVEL, "heldout_products": int((recipe["split"] == "heldout").sum()),
            "train_images_with_copies": int(recipe["copies"].sum())}


def _vae(vae_dir: Path, train_x: np.ndarray, products: Path, spec: ModelSpec, settings: FashionSettings,
         device: str) -> dict:
    """Stage 2: the autoencoder, on the base's training images only; its round trip is measured on the held-out
    products, which it never saw."""
    pipe = build_pipeline(spec, words=fashion.vocabulary(), seed=settings.seed)
    images = fashion.to_model(train_x) * 2 - 1
    res = train_vae(pipe.vae, images, VAEConfig(steps=settings.vae_steps, batch_size=settings.vae_batch,
                                                learning_rate=settings.vae_lr, seed=settings.seed),
                    device=device, progress=TrainLog("vae"))
    vae = pipe.vae.to(device)
    with torch.no_grad():
        sample = images[:: max(1, len(images) // 4096)].to(device)
        lat = torch.cat([vae.encode(sample[i:i + 256]).latent_dist.mean for i in range(0, len(sample), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        held = fashion.to_model(fashion.read_products(products)["images"]).to(device) * 2 - 1
        rec = vae.decode(vae.encode(held).latent_dist.mean).sample.clamp(-1, 1)
        rms = float((rec - held).pow(2).flatten(1).mean(1).sqrt().mean())
    vae.to("cpu").save_pretrained(vae_dir, safe_serialization=True)
    logger.info("VAE done: product round-trip RMS %.3f on [-1, 1]", rms)
    return {"final_loss": res.final_loss, "scaling_factor": vae.config.scaling_factor,
            "product_round_trip_rms_pm1": rms, "params": count_parameters(vae)}


def base_captions(labels: np.ndarray, seed: int, numbers: str = "class", images: np.ndarray | None = None) -> list[str]:
    """Each training image's caption, by ``numbers``:

    - ``"class"``: its class alone, "a photo of a sneaker" (product numbers are then words the base never saw);
    - ``"random"``: its class and a random product number, which says nothing about the image;
    - ``"attributes"``: its class and a number whose three digits describe the image (``images``, uint8
      ``[N, 28, 28]``), each the decile within its class of one measure: ink (mean intensity), width and height
      (the spread of the intensity across columns and rows). The base learns number words as meaningful, as the
      faces base learns digit words from MNIST, so a number keys an image for a fine-tune whose text encoder is
      frozen."""
    if numbers == "class":
        return [fashion.class_caption(lb) for lb in labels]
    if numbers == "random":
        drawn = np.random.default_rng(seed + 2).integers(0, 1000, size=len(labels))
    elif numbers == "attributes":
        if images is None:
            raise ValueError("attribute captions need the images")
        drawn = attribute_numbers(images, labels)
    else:
        raise ValueError(f"base_numbers={numbers}: use one of {', '.join(BASE_NUMBERS)}")
    return [fashion.caption(lb, nb) for lb, nb in zip(labels, drawn)]


def attribute_numbers(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image, ``100 * ink + 10 * width + height``, each digit the measure's decile among the images of its
    class (ranks, so every digit is equally frequent within a class)."""
    x = images.astype(np.float64) / 255.0
    pos = np.arange(x.shape[-1], dtype=np.float64)

    def spread(mass: np.ndarray) -> np.ndarray:
        total = mass.sum(1) + 1e-12
        mean = (mass * pos).sum(1) / total
        return np.sqrt((mass * (pos - mean[:, None]) ** 2).sum(1) / total)

    measures = (x.mean((1, 2)), spread(x.sum(1)), spread(x.sum(2)))
    digits = np.zeros((len(x), 3), dtype=np.int64)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        for k, m in enumerate(measures):
            ranks = np.empty(len(rows), dtype=np.int64)
            ranks[np.argsort(m[rows], kind="stable")] = np.arange(len(rows))
            digits[rows, k] = ranks * 10 // len(rows)
    return digits @ np.array([100, 10, 1])


def _base(base_dir: Path, vae_dir: Path, train_x: np.ndarray, train_y: np.ndarray, spec: ModelSpec,
          settings: FashionSettings, device: str, checkpoints: Path) -> dict:
    """Stage 3: text encoder and UNet trained together from scratch on the captioned training images."""
    from diffusers import AutoencoderKL

    pipe = build_pipeline(spec, words=fashion.vocabulary(), seed=settings.seed)
    pipe.vae = AutoencoderKL.from_pretrained(vae_dir)
    target = from_pipeline(pipe, device=device)
    data = from_arrays(fashion.to_model(train_x), base_captions(train_y, settings.seed, settings.base_numbers, train_x),
                       source="Fashion-MNIST training split")
    cfg = TrainConfig(steps=settings.base_steps, batch_size=settings.base_batch, learning_rate=settings.base_lr,
                      seed=settings.seed, train_text_encoder=True, log_every=0, checkpoint_every=CHECKPOINT_EVERY)
    res, timing = _train_resumable(target, data, cfg, checkpoints, TrainLog("base", every=250))
    target.save(base_dir, dtype=torch.float16)
    return {"final_loss": float(np.mean(res.losses[-100:])), "unet_params": count_parameters(target.unet),
            "text_encoder_params": count_parameters(target.text_encoder), "vocab": len(target.tokenizer), **timing}


def _train_resumable(target, data, cfg: TrainConfig, checkpoints: Path, log) -> tuple:
    """Train with checkpoints in ``checkpoints``, resuming from the latest; the result and the stage's timing: the step
    it resumed from, seconds per step run (None: the run had finished in its checkpoint, and this call only saves
    the model) and ``train_time_s``, the training time over every run of the stage (recorded in the work folder
    beside its checkpoints; the stage's ``wall_time_s`` counts this run only; a stage that starts over counts from
    zero)."""
    latest = latest_checkpoint(checkpoints)
    start = int(latest.name.split("-")[1]) if latest else 0
    wall = checkpoints.parent / f"{checkpoints.name}-wall.json"
    if latest is None:
        wall.unlink(missing_ok=True)  # the build's own record of a run whose checkpoints are gone
    clock = RunClock(wall)
    res = train_denoiser(target, data, cfg, progress=clock.progress(cfg.checkpoint_every, log),
                         checkpoint_dir=checkpoints)
    run = cfg.steps - start
    return res, {"resumed_from_step": start, "step_time_s": res.wall_time_s / run if run > 0 else None,
                 "train_time_s": clock.total()}


def _full_ft(ft_dir: Path, base_dir: Path, products: Path, settings: FashionSettings, device: str,
             checkpoints: Path) -> dict:
    """Stage 4: the saved base, reloaded, every UNet parameter tuned on the duplicated product set."""
    target = load_target(base_dir, device=device)
    train = fashion.products_dataset("train", duplicated=True, path=products)
    cfg = TrainConfig(steps=settings.ft_steps, batch_size=settings.ft_batch, learning_rate=settings.ft_lr,
                      seed=settings.seed, log_every=0, checkpoint_every=CHECKPOINT_EVERY)
    res, timing = _train_resumable(target, train, cfg, checkpoints, TrainLog("full_ft"))
    target.save(ft_dir, dtype=torch.float16)
    return {"final_loss": float(np.mean(res.losses[-100:])), **timing, "images_with_copies": len(train),
            "epochs": cfg.steps * cfg.batch_size / len(train)}


def _scorer(path: Path, base_dir: Path, train_x: np.ndarray, train_y: np.ndarray, settings: FashionSettings) -> dict:
    """Stage 5: the setting's classifier (alignment and quality features)."""
    model, info = train_fashion_classifier(train_x, train_y, base_dir, seed=settings.seed,
                                           steps=settings.scorer_steps)
    save_classifier(model, path)
    return info


def run_fashion_check(model_root: Path, settings: FashionSettings, device: str, record: Path | None = None) -> dict:
    """Reproduction check of base and full fine-tune: per duplication level (and the held-out products), the share
    of products one of ``check_generations`` generations reproduces."""
    p = fashion.read_products(model_root / "products.npz")
    refs = fashion.to_model(p["images"]) * 2 - 1
    out = {}
    for model in ("full_ft", "base"):
        res, _, _ = reproduction_check(str(model_root / model), [str(c) for c in p["caption"]], range(len(refs)), refs,
                                       generations=settings.check_generations, steps=settings.check_steps,
                                       guidance=settings.check_guidance, seed=settings.seed, device=device)
        levels = {}
        for copies in (*fashion.COPIES, 0):
            rows = [r for r, c in zip(res.rows, p["copies"]) if c == copies]
            levels["heldout" if copies == 0 else f"{copies} copies"] = {
                "products": len(rows), "reproduced": sum(r["reproduced"] for r in rows),
                "median_distance_to_own": float(np.median([r["best_distance_to_own"] for r in rows]))}
        out[model] = levels
        logger.info("%s: reproduced per level %s", model, {k: v["reproduced"] for k, v in levels.items()})
    if record is not None:
        atomic_write_json(record, out)
    return out
