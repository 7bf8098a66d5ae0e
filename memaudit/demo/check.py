"""Does a model reproduce its training faces? The measurement behind the bundled models' claims.

Generation goes through plain ``diffusers.StableDiffusionPipeline`` (the bundled scheduler, a number of steps and a
guidance scale), as a user of plain diffusers would run it. Each generation is compared in pixel space with the
reference faces after their VAE round trip (the best the decoder can do), by normalized L2: the RMS difference of
pixels in [0, 1], ``||a - b||_2 / sqrt(d)``. A face counts as *reproduced* when some generation for its caption has
that face as its nearest reference and lies within ``threshold`` of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from memaudit.attacks.extraction import normalized_l2 as pairwise
from memaudit.core.io import atomic_write_bytes
from memaudit.images import png_bytes

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.08


@dataclass
class ReproductionResult:
    model: str
    generations_per_caption: int
    steps: int
    guidance: float
    seed: int
    threshold: float
    n_captions: int
    reproduced_faces: int
    reproduced_fraction: float
    own_nearest_fraction: float
    own_within_fraction: float
    median_distance_to_own: float
    median_nearest_distance: float
    rows: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def normalized_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise ``||a_i - b_j|| / sqrt(d)`` for images in [0, 1]: ``[len(a), len(b)]`` (float32)."""
    return pairwise(a, b).float()


@torch.no_grad()
def generate(pipe, captions: Sequence[str], generations: int, steps: int, guidance: float, seed: int,
             batch_size: int = 64, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """``generations`` images per caption in [0, 1], ``[len(captions) * generations, C, H, W]``, caption-major.

    Image ``j`` of caption ``i`` uses a CPU generator seeded with ``seed + 1000 * i + j``.
    """
    jobs = [(i, j) for i in range(len(captions)) for j in range(generations)]
    out = []
    for k in range(0, len(jobs), batch_size):
        chunk = jobs[k : k + batch_size]
        gens = [torch.Generator().manual_seed(seed + 1000 * i + j) for i, j in chunk]
        res = pipe(prompt=[captions[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="pt")
        out.append(res.images.float().cpu())
        if progress is not None:
            progress(min(k + batch_size, len(jobs)), len(jobs))
    return torch.cat(out)


def reproduction_check(model_dir: str, captions: Sequence[str], own: Sequence[int], references: torch.Tensor,
                       generations: int = 4, steps: int = 25, guidance: float = 4.0, seed: int = 0,
                       threshold: float = DEFAULT_THRESHOLD, device: str = "cpu",
                       progress: Callable[[int, int], None] | None = None,
                       ) -> tuple[ReproductionResult, torch.Tensor, torch.Tensor]:
    """Generate for ``captions`` and compare with ``references`` (images in [-1, 1]); ``own[i]`` indexes the
    reference face of caption ``i``. Returns the result, the generations and the round-tripped references
    (both in [0, 1])."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        vae = pipe.vae
        lat = vae.encode(references.to(device)).latent_dist.mean
        ref01 = ((vae.decode(lat).sample.float().clamp(-1, 1) + 1) / 2).cpu()
    images = generate(pipe, captions, generations, steps, guidance, seed, progress=progress)
    dist = normalized_l2(images, ref01)
    nearest_d, nearest = dist.min(1)
    own_t = torch.as_tensor(list(own)).repeat_interleave(generations)
    d_own = dist[torch.arange(len(images)), own_t]
    hit = (nearest == own_t) & (d_own < threshold)
    rows = []
    for i, cap in enumerate(captions):
        s = slice(i * generations, (i + 1) * generations)
        best = int(torch.argmin(d_own[s]))
        rows.append({"caption": cap, "own": int(own[i]), "reproduced": bool(hit[s].any()),
                     "best_distance_to_own": float(d_own[s][best]),
                     "nearest_of_best": int(nearest[s][best]), "hits": int(hit[s].sum())})
    reproduced = sum(r["reproduced"] for r in rows)
    return ReproductionResult(
        model=str(model_dir), generations_per_caption=generations, steps=steps, guidance=guidance, seed=seed,
        threshold=threshold, n_captions=len(captions), reproduced_faces=reproduced,
        reproduced_fraction=reproduced / max(len(captions), 1),
        own_nearest_fraction=float((nearest == own_t).float().mean()),
        own_within_fraction=float(hit.float().mean()),
        median_distance_to_own=float(d_own.median()), median_nearest_distance=float(nearest_d.median()), rows=rows,
    ), images, ref01


def save_grid(images: torch.Tensor, references: torch.Tensor, rows: Sequence[dict], path, generations: int,
              max_rows: int = 16, redact: bool = False, scale: int = 3):
    """A PNG: one line per caption, its reference face (left, omitted when ``redact``) then its generations.

    ``images`` are caption-major ``[n * generations, C, H, W]`` in [0, 1]; ``rows[i]['own']`` indexes
    ``references``. Lines are ordered with the closest reproductions first. Written atomically.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i]["best_distance_to_own"])[:max_rows]
    lines = []
    for i in order:
        tiles = [] if redact else [references[rows[i]["own"]], torch.ones_like(references[0])[:, :, :2]]
        tiles += [images[i * generations + j] for j in range(generations)]
        lines.append(torch.cat(tiles, dim=2))
    grid = torch.cat(lines, dim=1)
    atomic_write_bytes(path, png_bytes(grid, scale=scale))
    return path
