"""The extraction attack of Carlini et al., "Extracting Training Data from Diffusion Models" (USENIX Security 2023).

For each prompt the model generates many images. Two generations are *joined* when their distance is below
``edge_threshold``; the distance is the maximum over a ``tiles x tiles`` grid of the per-tile L2 distance,
normalized by the square root of the number of values in the tile (pixels in [0, 1]), so that two images that
differ strongly in one region are far apart even when they agree elsewhere. A prompt is *flagged* when the largest
clique of that graph (a true maximum clique, not a connected component) has at least ``min_clique`` members, and
*extracted* when the clique's medoid lies within ``delta`` (normalized L2 over the whole image) of a training
image: by default the caption's own image when it is known, otherwise the nearest training image. The training
images are a tensor or an :class:`~memaudit.index.ImageLookup`: a :class:`~memaudit.index.ThumbnailLookup` finds
the exact nearest image while reading only a few of them (an audit of a large set on disk).

The maximum clique is exact (:func:`~memaudit.attacks.clique.max_clique`): exact graph reductions, then a bitset branch and bound. It is
NP-hard in the worst case (dense graphs without a dominant clique, e.g. a miscalibrated threshold that joins about
half of the pairs of 300 equally noisy generations), so ``max_clique_nodes`` and ``max_clique_steps`` bound the
work and raise :class:`~memaudit.core.errors.ConfigError` beyond it rather than running for hours.

Images are float tensors ``[N, C, H, W]`` in [0, 1]. Distances are accumulated in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from memaudit.attacks.clique import greedy_clique, max_clique, medoid
from memaudit.core.errors import ConfigError
from memaudit.core.settings import setting
from memaudit.index.lookup import ExhaustiveLookup, ImageLookup

logger = logging.getLogger(__name__)

__all__ = ["ExtractionConfig", "PromptVerdict", "analyze_prompt", "calibrate_edge_threshold", "count_extracted",
           "max_clique", "medoid", "normalized_l2", "tiled_distances"]

# bound on the float64 temporaries of a distance computation (values per chunk)
_CHUNK_VALUES = 1 << 24



@dataclass
class ExtractionConfig:
    """Settings of :func:`analyze_prompt`; each field's ``help`` metadata is its documentation."""

    tiles: int = setting("the image is split into a tiles x tiles grid for the max-over-tiles L2 (paper: 4); "
                       "the image side must be at least this", default=4)
    edge_threshold: float = setting("two generations are joined when their max-over-tiles normalized L2 is below "
                                  "this (calibrate it on prompts known not to be memorized)", default=0.10)
    min_clique: int = setting("k: flag a prompt when its largest clique has at least this many members (paper: 10)",
                            default=10)
    delta: float = setting("extracted when the clique medoid's normalized L2 to its training image is below this "
                         "(paper: 0.15)", default=0.15)
    max_clique_nodes: int = setting("refuse graphs with more generations than this (the exact clique search is "
                                  "exponential in the worst case)", default=2000)
    max_clique_steps: int | None = setting("give up (ConfigError) after this many branch-and-bound search nodes on one "
                                  "prompt's graph (20-80 us each); None: no limit", default=2_000_000)

    def __post_init__(self):
        checks = [
            (_is_int(self.tiles) and self.tiles >= 1, "tiles must be an integer >= 1"),
            (_finite(self.edge_threshold) and self.edge_threshold > 0, "edge_threshold must be a positive number"),
            (_is_int(self.min_clique) and self.min_clique >= 2, "min_clique must be an integer >= 2"),
            (_finite(self.delta) and self.delta > 0, "delta must be a positive number"),
            (_is_int(self.max_clique_nodes) and self.max_clique_nodes >= 1,
             "max_clique_nodes must be an integer >= 1"),
            (self.max_clique_steps is None or (_is_int(self.max_clique_steps) and self.max_clique_steps >= 1),
             "max_clique_steps must be an integer >= 1 or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"extraction setting invalid: {msg}.")

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------------------------------------------


def _check_images(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.ndim != 4:
        raise ConfigError(f"{name} must be a [N, C, H, W] image tensor, got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        x = x.float()
    return x


def _pairwise_sq(a: Tensor, b: Tensor | None) -> Tensor:
    """Squared Euclidean distances between the rows of ``a`` [N, d] and ``b`` [M, d] (``b=None``: ``a`` vs ``a``),
    in float64, through ``|x|^2 + |y|^2 - 2 x.y`` accumulated over feature chunks; clamped at 0."""
    n, d = a.shape
    m = n if b is None else b.shape[0]
    out = torch.zeros(n, m, dtype=torch.float64, device=a.device)
    na = torch.zeros(n, dtype=torch.float64, device=a.device)
    nb = na if b is None else torch.zeros(m, dtype=torch.float64, device=a.device)
    step = max(1, _CHUNK_VALUES // max(1, n + m))
    for s in range(0, d, step):
        ca = a[:, s:s + step].to(torch.float64)
        na += (ca * ca).sum(1)
        if b is None:
            out.addmm_(ca, ca.T, alpha=-2.0)
        else:
            cb = b[:, s:s + step].to(device=a.device, dtype=torch.float64)
            nb += (cb * cb).sum(1)
            out.addmm_(ca, cb.T, alpha=-2.0)
    out += na[:, None]
    out += nb[None, :]
    return out.clamp_(min=0.0)


def _check_pair(a: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    a = _check_images(a, "images")
    if b is not None:
        b = _check_images(b, "second images")
        if tuple(b.shape[1:]) != tuple(a.shape[1:]):
            raise ConfigError(f"cannot compare {'x'.join(map(str, a.shape[1:]))} images with "
                              f"{'x'.join(map(str, b.shape[1:]))} images; resize them to the same shape first.")
    return a, b


def tiled_distances(a: Tensor, b: Tensor | None = None, tiles: int = 4) -> Tensor:
    """Pairwise max-over-tiles normalized L2 distances, ``[len(a), len(b)]`` float64.

    Each image is split into a ``tiles x tiles`` grid (with :func:`torch.tensor_split`, so a side not divisible by
    ``tiles`` gives tiles of unequal size); for each tile the L2 distance is divided by the square root of the
    number of values in that tile (``C * h * w``), and the maximum over the tiles is kept. With ``b=None`` the
    result is ``a`` against itself: symmetric with an exactly zero diagonal.
    """
    a, b = _check_pair(a, b)
    if not _is_int(tiles) or tiles < 1:
        raise ConfigError(f"tiles must be an integer >= 1, got {tiles!r}.")
    tiles = int(tiles)
    _, _, h, w = a.shape
    if min(h, w) < tiles:
        raise ConfigError(f"images of {h}x{w} px cannot be split into {tiles}x{tiles} tiles; "
                          f"use tiles <= {min(h, w)} or larger images.")
    if len(a) == 0 or (b is not None and len(b) == 0):
        return torch.zeros(len(a), len(a) if b is None else len(b), dtype=torch.float64, device=a.device)
    best = None
    rows_a = torch.tensor_split(a, tiles, dim=2)
    rows_b = torch.tensor_split(b, tiles, dim=2) if b is not None else [None] * tiles
    for ra, rb in zip(rows_a, rows_b):
        cols_a = torch.tensor_split(ra, tiles, dim=3)
        cols_b = torch.tensor_split(rb, tiles, dim=3) if rb is not None else [None] * tiles
        for ta, tb in zip(cols_a, cols_b):
            size = ta[0].numel()
            fa = ta.reshape(len(ta), -1)
            fb = None if tb is None else tb.reshape(len(tb), -1)
            d2 = _pairwise_sq(fa, fb) / size
            best = d2 if best is None else torch.maximum(best, d2)
    out = best.sqrt_()
    if b is None:
        out = (out + out.T) / 2
        out.fill_diagonal_(0.0)
    return out


def normalized_l2(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Pairwise whole-image normalized L2, ``||x - y||_2 / sqrt(d)`` with ``d = C * H * W``; ``[len(a), len(b)]``
    float64 (``b=None``: ``a`` against itself, zero diagonal)."""
    a, b = _check_pair(a, b)
    if len(a) == 0 or (b is not None and len(b) == 0):
        return torch.zeros(len(a), len(a) if b is None else len(b), dtype=torch.float64, device=a.device)
    d = math.prod(a.shape[1:])
    fa = a.reshape(len(a), -1)
    fb = None if b is None else b.reshape(len(b), -1)
    out = (_pairwise_sq(fa, fb) / d).sqrt_()
    if b is None:
        out = (out + out.T) / 2
        out.fill_diagonal_(0.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the attack
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PromptVerdict:
    """The extraction attack's result for one prompt.

    ``clique``: sorted generation indices of the largest clique; ``medoid``: its medoid (a generation index, None
    only without generations); ``nearest_train_*``: the training image compared with the medoid (the caption's
    own image when known, else the nearest) and the normalized L2 to it, None without training images;
    ``extracted``: flagged and that distance is below ``delta``.
    """

    clique: list[int]
    clique_size: int
    flagged: bool
    medoid: int | None
    nearest_train_index: int | None
    nearest_train_distance: float | None
    extracted: bool
    clique_exact: bool = True  # False: the exact search hit max_clique_steps and ``clique`` is a greedy lower bound

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(x: Tensor) -> str:
    return "x".join(str(s) for s in x.shape[1:])


def analyze_prompt(generations: Tensor, config: ExtractionConfig | None = None,
                   train_images: Tensor | ImageLookup | None = None, own_index: int | None = None) -> PromptVerdict:
    """Run the extraction attack on the generations ``[n, C, H, W]`` (in [0, 1]) of one prompt.

    Generations are joined when their :func:`tiled_distances` is below ``config.edge_threshold``; the prompt is
    flagged when the maximum clique has at least ``config.min_clique`` members. The clique's medoid is compared
    (normalized L2, :func:`memaudit.index.exact_distances`) with training image ``own_index`` when it is given,
    else with every training image (the nearest is kept; among equal distances the lowest index); the prompt is
    extracted when it is flagged and that distance is below ``config.delta``. The nearest training image is reported
    for unflagged prompts too, but they are never extracted.

    ``train_images``: a tensor ``[N, C, H, W]`` in [0, 1] (compared exhaustively), or an
    :class:`~memaudit.index.ImageLookup` of images of the generations' shape, e.g. a
    :class:`~memaudit.index.ThumbnailLookup` that reads only the candidates it needs and gives the same answer.
    """
    config = config or ExtractionConfig()
    generations = _check_images(generations, "generations")
    n = len(generations)
    if n == 0:
        raise ConfigError("analyze_prompt needs at least one generation of the prompt.")
    if n > config.max_clique_nodes:
        raise ConfigError(f"{n} generations for one prompt is more than max_clique_nodes={config.max_clique_nodes}; "
                          f"use fewer generations or raise max_clique_nodes.")
    lookup = None
    if train_images is not None:
        if isinstance(train_images, ImageLookup):
            lookup, shape = train_images, tuple(train_images.shape)
        else:
            train_images = _check_images(train_images, "training images")
            shape = tuple(train_images.shape[1:])
        if shape != tuple(generations.shape[1:]):
            raise ConfigError(f"training images are {'x'.join(map(str, shape))} but generations are "
                              f"{_shape(generations)} (CxHxW); resize the training images to the generations' shape.")
        n_train = len(lookup) if lookup is not None else len(train_images)
        if n_train == 0:
            raise ConfigError("train_images is empty; pass at least one training image or None.")
        if own_index is not None and not 0 <= int(own_index) < n_train:
            raise ConfigError(f"own_index {own_index} is out of range for {n_train} training images.")
        if lookup is None:
            lookup = ExhaustiveLookup(train_images)

    dist = tiled_distances(generations, tiles=config.tiles)
    adj = (dist < config.edge_threshold).cpu().numpy()
    exact = True
    try:
        clique = max_clique(adj, max_nodes=config.max_clique_nodes, max_steps=config.max_clique_steps)
    except ConfigError:
        # The exact search gave up (a dense graph without a dominant clique). A greedy clique is still a true
        # clique, so flagging on it is sound; it can only under-count. The verdict says it is not exact.
        a = np.asarray(adj.detach().cpu().numpy() if isinstance(adj, Tensor) else adj, dtype=bool).copy()
        np.fill_diagonal(a, False)
        clique = sorted(int(i) for i in greedy_clique(a, a.sum(1)))
        exact = False
        logger.warning("clique search on %d generations hit max_clique_steps=%s; using a greedy clique of %d",
                       n, config.max_clique_steps, len(clique))
    size = len(clique)
    flagged = size >= config.min_clique
    med = medoid(clique, dist) if clique else None

    near_idx = near_dist = None
    if lookup is not None and med is not None:
        g = generations[med]
        if own_index is not None:
            near_idx = int(own_index)
            near_dist = lookup.distance(g, near_idx)
        else:
            near_idx, near_dist = lookup.nearest(g)
    extracted = bool(flagged and near_dist is not None and near_dist < config.delta)
    logger.debug("prompt: clique %d of %d generations, flagged=%s, medoid=%s, train=%s at %s, extracted=%s",
                 size, n, flagged, med, near_idx, near_dist, extracted)
    return PromptVerdict(clique=clique, clique_size=size, flagged=flagged, medoid=med, nearest_train_index=near_idx,
                         nearest_train_distance=near_dist, extracted=extracted, clique_exact=exact)


def count_extracted(verdicts: Sequence[PromptVerdict], own_indices: Sequence[int | None] | None = None) -> int:
    """Number of distinct training images extracted: two prompts extracting the same image count once.

    The image of an extracted verdict is ``own_indices[i]`` when given and not None, else its
    ``nearest_train_index``; an extracted verdict with neither counts as one image of its own.
    """
    if own_indices is not None and len(own_indices) != len(verdicts):
        raise ConfigError(f"own_indices has {len(own_indices)} entries for {len(verdicts)} verdicts; "
                          f"pass one (or None) per verdict.")
    seen: set = set()
    for i, v in enumerate(verdicts):
        if not v.extracted:
            continue
        key = own_indices[i] if own_indices is not None and own_indices[i] is not None else v.nearest_train_index
        seen.add(int(key) if key is not None else ("unknown", i))
    return len(seen)


def calibrate_edge_threshold(generations_per_prompt: Sequence[Tensor], tiles: int = 4,
                             quantile: float = 0.001) -> float:
    """Edge threshold from prompts known NOT to be memorized.

    All within-prompt pairwise :func:`tiled_distances` are pooled and their ``quantile`` quantile is returned
    (numpy method ``"lower"``, so it is an observed distance). Since edges need a distance strictly below the
    threshold, at most a fraction ``quantile`` of these non-memorized pairs would be joined (none for 0).
    """
    if not _finite(quantile) or not 0.0 <= float(quantile) <= 1.0:
        raise ConfigError(f"quantile must be in [0, 1], got {quantile!r}.")
    pooled = []
    for gens in generations_per_prompt:
        gens = _check_images(gens, "reference generations")
        if len(gens) < 2:
            continue
        d = tiled_distances(gens, tiles=tiles)
        iu = torch.triu_indices(len(gens), len(gens), offset=1)
        pooled.append(d[iu[0], iu[1]].cpu().numpy())
    if not pooled:
        raise ConfigError("calibrating the edge threshold needs reference prompts with at least 2 generations each; "
                          "raise the number of generations or add reference prompts.")
    values = np.concatenate(pooled)
    threshold = float(np.quantile(values, float(quantile), method="lower"))
    logger.info("edge threshold %.4f: the %g quantile of %d non-memorized pairs", threshold, quantile, len(values))
    return threshold
