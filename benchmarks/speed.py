"""The project's speed figures: one benchmark per part, printed as Markdown tables and merged into one JSON file.

Parts (``--part``, repeatable or comma-separated; ``all`` runs every part, in this order):

``audit``
    Wall time of ``memaudit audit`` beside plain diffusers sampling of the same images (same model, prompts, seeds,
    scheduler, steps, guidance, batch size), each side including model loading; alternating runs, best of
    ``--repeats`` per side (the logic of ``benchmarks/audit_speed.py``). Target: audit / plain <= 1.10.
``nn``
    Nearest-neighbour search for AMD (k=1, cosine distance): faiss exact and faiss IVF through
    :class:`memaudit.index.NeighborIndex` (IVF at its default ``nlist``/``nprobe`` as the audit uses it, and at
    one higher ``nprobe``) against scikit-learn brute force, on synthetic training features of 10^4, 10^5 and 10^6
    vectors. Default dimension 64 (the demo's feature size); CLIP image features would be ``--nn-dim 512``.
    The data are clustered Gaussian vectors (100 centres), and the queries half near-copies of training vectors
    (a training vector plus small noise, like a memorized generation), half fresh draws from the same clusters.
    Reported: build, search and total time, speed-up of the total over scikit-learn, and recall@1 against an
    exact float64 reference (a tie, i.e. another vector at the exact nearest distance within 1e-5, counts as a
    hit). Target: faiss faster than scikit-learn at every size, with recall@1 >= 0.99 for IVF.
``triage``
    On the partially memorized zoo variant of ``benchmarks/detection.py`` (8 of 80 faces duplicated 25 times):
    score every training caption from one cheap pass over a few generations, run the full extraction attack only on
    the highest-scoring share of the captions, and compare with the full attack on every caption, run in the same
    process: the share of its extracted faces found against the share of its UNet evaluations spent. Two scores:
    the first-step denoising strength (one UNet call per image) and the short-pass consistency (how alike the
    generations of a 5-step sampling pass are). Target: >= 95% found for <= 20% spent.

``search``
    Hypervolume of the mask search's Pareto front against its total inner-loop fine-tuning steps, for plain NSGA-II
    (``benchmarks/memcontrol.py``'s search) and the ``screen`` schedule of :mod:`memaudit.mitigate.search`
    (NSGA-II on short screening fine-tunes, then the ``--search-promote`` masks that spread best along their front
    fine-tuned for the full inner steps, the front's two ends first). Target: the
    plain search's final hypervolume at a third of its steps. Plot: ``search_hypervolume.png``.
``workers``
    ``memaudit audit --workers N`` on this machine, the bundled full fine-tune on ``--workers-prompts`` training
    captions: wall time of one worker in this process with one torch thread, of two Ray workers with one thread each
    (a local Ray instance started by the audit, included), and of one worker with two threads; the fixed cost of Ray
    (``ray.init`` of a local instance, and the workers loading their models); and whether each results.json equals
    the one-thread run's. The feature cache is filled by an untimed warm-up first. On two cores this cannot show
    what workers are for (one model replica per GPU or per machine): it measures their overhead.

Other parts are added by putting a function ``part(args) -> dict`` into ``PARTS`` (and its options, named
``--<part>-...``, into ``_parser``). A part's record is JSON-able, holds its raw numbers and settings and a
``markdown`` table; the machine, versions and command are added by ``main``. Records are merged into ``--json``
(default ``benchmarks/speed.json``): parts run now replace their old records, others are kept, so running parts
one at a time accumulates one file.

    python benchmarks/speed.py [--part audit|nn|all ...] [--device cpu] [--json benchmarks/speed.json]
        [--audit-prompts 20 --audit-generations 10 --repeats 2]
        [--nn-sizes 1e4,1e5,1e6 --nn-dim 64 --nn-queries 1000 --nn-nprobe-high 64 --seed 0]
        [--triage-generations 4 --triage-short-steps 5 --triage-fractions 0.05,0.1,0.15,0.2]
        [--workers-prompts 16 --workers-generations 4 --workers-steps 25 --workers-batch-size 16 --workers-repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import machine_info

HERE = Path(__file__).resolve().parent
AUDIT_TARGET = 1.10
NN_RECALL_TARGET = 0.99
NN_CLUSTERS = 100
NN_SPREAD = 0.6  # per-coordinate standard deviation of a cluster (centres are standard normal)
NN_NEAR_NOISE = 0.05  # near-copy queries: training vector + NN_NEAR_NOISE * NN_SPREAD * N(0, 1) per coordinate
NN_NEAR_FRACTION = 0.5
NN_TIE_TOL = 1e-5


# -- machine and versions ------------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import faiss
    import sklearn

    import memaudit

    return {"torch": torch.__version__, "faiss": faiss.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__, "memaudit": memaudit.__version__}


def _bench_module(name: str):
    """Import a sibling benchmark script (``benchmarks/<name>.py``) as a module."""
    sys.path.insert(0, str(HERE))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(HERE))


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.1f}" for t in times)


# -- part: audit ---------------------------------------------------------------------------------------------------


def part_audit(args: argparse.Namespace) -> dict[str, Any]:
    """Audit cost beside plain sampling (see ``benchmarks/audit_speed.py``)."""
    import diffusers

    from memaudit import demo

    measure = _bench_module("audit_speed").measure
    diffusers.utils.logging.disable_progress_bar()
    train = demo.faces_dataset("train")
    prompts = train.captions[: args.audit_prompts]
    settings = {"model": args.audit_model, "prompts": len(prompts), "generations": args.audit_generations,
                "steps": args.audit_steps, "guidance": args.audit_guidance, "batch_size": args.audit_batch_size,
                "repeats": args.repeats, "order": "plain, audit, plain, audit, ...; best per side"}
    r = measure(args.audit_model, prompts, train, args.audit_generations, args.audit_steps, args.audit_guidance,
                args.audit_batch_size, args.device, args.repeats)
    plain, audit, ratio = r["plain_s"], r["audit_s"], r["ratio"]
    margin = abs(ratio / AUDIT_TARGET - 1) * 100
    verdict = f"target <= {AUDIT_TARGET:.2f}: {'met' if ratio <= AUDIT_TARGET else 'MISSED'} by {margin:.1f}%"
    md = "\n".join([
        f"{r['images']} images ({len(prompts)} prompts x {args.audit_generations}), {args.audit_steps} steps, "
        f"guidance {args.audit_guidance}, batch {args.audit_batch_size}; best of {args.repeats}",
        "",
        "| side | wall s (best) | all runs | ratio |",
        "|---|---|---|---|",
        f"| plain diffusers sampling | {min(plain):.1f} | {_runs(plain)} | 1.00 |",
        f"| memaudit audit | {min(audit):.1f} | {_runs(audit)} | **{ratio:.2f}** |",
        "",
        verdict,
    ])
    return {"settings": settings, "seeds": {"generation": r["seed"]}, "extra_versions":
            {"diffusers": diffusers.__version__}, "images": r["images"], "plain_s": plain, "audit_s": audit,
            "ratio": ratio, "target": AUDIT_TARGET, "met": ratio <= AUDIT_TARGET, "markdown": md}


# -- part: nn ------------------------------------------------------------------------------------------------------


def nn_data(n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered float32 training vectors ``[n, dim]``, queries ``[queries, dim]`` and a mask of near-copy queries.

    The cluster centres depend on ``seed`` only, so every size draws from the same clusters.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NN_CLUSTERS, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, n])
    train = centres[rng.integers(0, NN_CLUSTERS, n)]
    chunk = 1 << 17  # add the noise in slices, to keep the peak memory near that of the array
    for a in range(0, n, chunk):
        train[a : a + chunk] += NN_SPREAD * rng.standard_normal((min(chunk, n - a), dim), dtype=np.float32)
    n_near = int(round(queries * NN_NEAR_FRACTION))
    near = train[rng.integers(0, n, n_near)] + \
        NN_NEAR_NOISE * NN_SPREAD * rng.standard_normal((n_near, dim), dtype=np.float32)
    fresh = centres[rng.integers(0, NN_CLUSTERS, queries - n_near)] + \
        NN_SPREAD * rng.standard_normal((queries - n_near, dim), dtype=np.float32)
    is_near = np.arange(queries) < n_near
    return train, np.ascontiguousarray(np.vstack([near, fresh]), dtype=np.float32), is_near


def _unit64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def exact_cosine_nn(train: np.ndarray, queries: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Reference nearest neighbours by cosine distance in float64: ``(distances, indices)``, each ``[Q]``."""
    q = _unit64(queries)
    best = np.full(len(q), -np.inf)
    best_idx = np.zeros(len(q), dtype=np.int64)
    for a in range(0, len(train), chunk):
        sims = q @ _unit64(train[a : a + chunk]).T
        j = sims.argmax(axis=1)
        s = sims[np.arange(len(q)), j]
        better = s > best
        best[better], best_idx[better] = s[better], a + j[better]
    return 1.0 - best, best_idx


def recall_at_1(found: np.ndarray, train: np.ndarray, queries: np.ndarray, ref_dist: np.ndarray,
                ref_idx: np.ndarray) -> np.ndarray:
    """Per-query hit: the exact nearest vector, or one at the same float64 cosine distance within ``NN_TIE_TOL``."""
    found = np.asarray(found, dtype=np.int64).reshape(-1)
    ok = found >= 0
    dist = np.full(len(found), np.inf)
    dist[ok] = 1.0 - np.einsum("ij,ij->i", _unit64(queries[ok]), _unit64(train[found[ok]]))
    return (found == ref_idx) | (np.abs(dist - ref_dist) <= NN_TIE_TOL)


def _time(fn: Callable[..., Any], *fn_args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*fn_args)
    return time.perf_counter() - t0, out


def _nn_methods(device: str, nprobe_high: int) -> list[tuple[str, Callable, Callable]]:
    """``(name, build(train) -> index, search(index, queries) -> indices [Q])`` per method, scikit-learn first.

    A method whose build is ``None`` reuses the index of the method before it (only its search is timed).
    """
    from sklearn.neighbors import NearestNeighbors

    from memaudit.index import NeighborIndex

    def sk_build(x):
        return NearestNeighbors(n_neighbors=1, algorithm="brute", metric="cosine").fit(x)

    def sk_search(nn, q):
        return nn.kneighbors(q, n_neighbors=1, return_distance=False)[:, 0]

    def faiss_search(index, q):
        return index.search(q, k=1)[1][:, 0]

    def high_search(index, q):
        default = index.nprobe
        index.nprobe = nprobe_high
        try:
            return faiss_search(index, q)
        finally:
            index.nprobe = default

    methods = [
        ("sklearn brute", sk_build, sk_search),
        ("faiss exact", lambda x: NeighborIndex(metric="cosine", kind="exact", device=device).add(x), faiss_search),
        ("faiss IVF", lambda x: NeighborIndex(metric="cosine", kind="ivf", device=device).add(x), faiss_search),
    ]
    if nprobe_high:
        methods.append((f"faiss IVF nprobe={nprobe_high}", None, high_search))
    return methods


def _ivf_nprobe(name: str, index: Any, nprobe_high: int) -> int | None:
    """The nprobe a faiss IVF method searched with (capped at nlist, as NeighborIndex does), else None."""
    if name == "faiss IVF":
        return min(index.nprobe, index.nlist)
    if name.startswith("faiss IVF nprobe"):
        return min(nprobe_high, index.nlist)
    return None


def part_nn(args: argparse.Namespace) -> dict[str, Any]:
    """Nearest-neighbour search for AMD: faiss exact and IVF against scikit-learn brute force."""
    from memaudit.index import NeighborIndex

    sizes = args.nn_sizes
    methods = _nn_methods(args.device, args.nn_nprobe_high)
    defaults = NeighborIndex()
    settings = {"sizes": sizes, "dim": args.nn_dim, "queries": args.nn_queries, "k": 1, "metric": "cosine",
                "clusters": NN_CLUSTERS, "cluster_spread": NN_SPREAD, "near_noise": NN_NEAR_NOISE * NN_SPREAD,
                "near_fraction": NN_NEAR_FRACTION, "tie_tolerance": NN_TIE_TOL, "repeats": args.nn_repeats,
                "ivf_default_nprobe": defaults.nprobe, "ivf_nlist_rule": "min(4 sqrt(N), N // 39)",
                "nprobe_high": args.nn_nprobe_high, "audit_ivf_threshold": defaults.ivf_threshold,
                "warmup": "each method built and searched once on 2,000 vectors before timing",
                "reference": "float64 brute force (not timed)"}
    # warm-up (excluded): first calls load BLAS/OpenMP thread pools and code paths
    wx, wq, _ = nn_data(2000, args.nn_dim, 50, args.seed + 1)
    index = None
    for _, build, search in methods:
        index = build(wx) if build is not None else index
        search(index, wq)

    rows = []
    for n in sizes:
        train, queries, is_near = nn_data(n, args.nn_dim, args.nn_queries, args.seed)
        ref_dist, ref_idx = exact_cosine_nn(train, queries)
        index, build_s = None, 0.0
        for name, build, search in methods:
            builds, searches = [], []
            for _ in range(args.nn_repeats):
                if build is not None:
                    index = None  # free the previous index first
                    b, index = _time(build, train)
                    builds.append(b)
                s, found = _time(search, index, queries)
                searches.append(s)
            if build is not None:
                build_s = min(builds)
            hits = recall_at_1(found, train, queries, ref_dist, ref_idx)
            nprobe = _ivf_nprobe(name, index, args.nn_nprobe_high)
            label = name if nprobe is None else f"faiss IVF (nlist {index.nlist}, nprobe {nprobe})"
            row = {"n": n, "method": name, "label": label,
                   "build_s": build_s, "search_s": min(searches), "build_runs": builds, "search_runs": searches,
                   "shared_build": build is None, "recall_at_1": float(hits.mean()),
                   "recall_near": float(hits[is_near].mean()) if is_near.any() else None,
                   "recall_fresh": float(hits[~is_near].mean()) if (~is_near).any() else None}
            if nprobe is not None:
                row["nlist"], row["nprobe"] = index.nlist, nprobe
            row["total_s"] = row["build_s"] + row["search_s"]
            rows.append(row)
        del train, queries, index
        base = next(r for r in rows if r["n"] == n and r["method"] == "sklearn brute")
        for r in rows:
            if r["n"] == n:
                r["speedup_vs_sklearn"] = base["total_s"] / r["total_s"] if r["total_s"] > 0 else None

    lines = [f"{args.nn_queries:,} queries ({NN_NEAR_FRACTION:.0%} near-copies of training vectors, the rest fresh), "
             f"dimension {args.nn_dim}, k=1, cosine; {NN_CLUSTERS} Gaussian clusters; best of {args.nn_repeats}",
             "",
             "| training vectors | method | build s | search s | total s | speed-up vs sklearn | recall@1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        build = f"({r['build_s']:.3f})" if r["shared_build"] else f"{r['build_s']:.3f}"
        speed = "-" if r["speedup_vs_sklearn"] is None else f"{r['speedup_vs_sklearn']:.1f}x"
        lines.append(f"| {r['n']:,} | {r['label']} | {build} | {r['search_s']:.3f} | {r['total_s']:.3f} | {speed} "
                     f"| {r['recall_at_1']:.3f} |")
    ivf = [r for r in rows if r["method"].startswith("faiss IVF")]
    worst = min(ivf, key=lambda r: r["recall_at_1"]) if ivf else None
    faiss_rows = [r for r in rows if r["method"] != "sklearn brute"]
    slower = [r for r in faiss_rows if (r["speedup_vs_sklearn"] or 0) < 1]
    lines += ["",
              "Build in parentheses: the same index as the row above, searched with a higher nprobe. Recall@1 is "
              f"against a float64 brute-force reference; a vector at the nearest distance within {NN_TIE_TOL:g} "
              f"counts. The audit's default kind='auto' uses exact below {defaults.ivf_threshold:,} training vectors "
              "and IVF from there on.",
              ""]
    if worst is not None:
        lines.append("IVF recall@1 near-copies / fresh queries: " + "; ".join(
            f"{r['n']:,} nprobe {r.get('nprobe')}: {r['recall_near']:.3f} / {r['recall_fresh']:.3f}" for r in ivf))
        lines.append("")
    met = not slower and (worst is None or worst["recall_at_1"] >= NN_RECALL_TARGET)
    lines.append(f"target faiss faster than sklearn at every size, IVF recall@1 >= {NN_RECALL_TARGET}: "
                 f"{'met' if met else 'MISSED'}"
                 + (" (slower: " + ", ".join(f"{r['label']} at {r['n']:,}" for r in slower) + ")" if slower else "")
                 + (f"; lowest IVF recall@1 {worst['recall_at_1']:.3f}" if worst is not None else ""))
    return {"settings": settings, "seeds": {"data": args.seed, "ivf_kmeans": defaults.seed, "warmup_data": args.seed + 1},
            "rows": rows, "met": met, "markdown": "\n".join(lines)}


# -- part: triage --------------------------------------------------------------------------------------------------


def short_pass_scores(model: Path, prompts: list[str], generations: int, steps: int, seed: int, device: str,
                      guidance: float, batch_size: int) -> np.ndarray:
    """Per prompt, how alike its generations of a short sampling pass are: minus the mean pairwise tiled L2 distance
    (the extraction attack's distance) between ``generations`` images of ``steps`` DDIM steps, drawn from the same
    initial latents as the audit's first ``generations``. Memorized prompts give near-identical images: high score."""
    import torch

    from memaudit.attacks.extraction import tiled_distances
    from memaudit.sampling import Sampler
    from memaudit.target import load_target

    sampler = Sampler(load_target(str(model), device=device), steps=steps, guidance=guidance, batch_size=batch_size,
                      seed=seed)
    images: torch.Tensor | None = None
    for batch in sampler.run(prompts, generations):
        if images is None:
            images = torch.empty(len(prompts), generations, *batch.images.shape[1:])
        images[batch.prompt_index, batch.generation] = batch.images
    pairs = generations * (generations - 1)
    return np.array([-float(tiled_distances(images[i]).sum()) / pairs for i in range(len(prompts))])


def part_triage(args: argparse.Namespace) -> dict[str, Any]:
    """Score every caption from one cheap pass, run the extraction attack on the top fraction only.

    Two scores, both from ``--triage-generations`` images per caption with the audit's initial latents:
    ``first-step strength`` (the denoising strength at the first sampling step: one UNet call per image) and
    ``short-pass consistency`` (the images of a ``--triage-short-steps``-step sampling pass, scored by how alike
    they are; :func:`short_pass_scores`). On the partially memorized zoo variant of ``benchmarks/detection.py``
    (built there, or here when absent). Everything runs in this process: the full attack on all 80 training
    captions, then, per score and fraction, the scoring pass and the attack on the highest-scoring captions (an
    identical set of captions is attacked once). UNet evaluations count one per image per denoising step (a guided
    step is one batched call, on both sides alike)."""
    import math
    import tempfile

    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit
    from memaudit.demo.run import DEMO_SETTINGS

    detection = _bench_module("detection")
    model, dup = detection.partial_model(args.triage_work, args.device)
    train = demo.faces_dataset("train")
    captions = train.captions
    cfg = AuditConfig(**{**DEMO_SETTINGS, "quality_features": None, "alignment": None, "seed": 0,
                         "device": args.device})
    g, short = args.triage_generations, args.triage_short_steps
    tmp = Path(tempfile.mkdtemp())
    attacked: dict[frozenset, tuple[set[int], float, list[int]]] = {}

    def attack(prompts: list[str]) -> tuple[set[int], float, list[int]]:
        """Training faces extracted, wall time, and the positions in ``prompts`` of the extracted captions."""
        key = frozenset(prompts)
        if key not in attacked:
            t0 = time.perf_counter()
            res = run_audit(str(model), train, tmp / f"attack{len(attacked)}", prompts=prompts, config=cfg)
            attacked[key] = ({p["nearest_train_index"] for p in res["prompts"] if p["extracted"]},
                             time.perf_counter() - t0, [i for i, p in enumerate(res["prompts"]) if p["extracted"]])
        return attacked[key]

    scorers = {
        "first-step strength": (lambda: detection.first_step_scores(
            model, captions, g, seed=cfg.seed, device=args.device, steps=cfg.steps, guidance=cfg.guidance,
            batch_size=cfg.batch_size), len(captions) * g),
        "short-pass consistency": (lambda: short_pass_scores(
            model, captions, g, short, seed=cfg.seed, device=args.device, guidance=cfg.guidance,
            batch_size=cfg.batch_size), len(captions) * g * short),
    }
    try:
        full_set, full_s, full_prompts = attack(captions)
        full_evals = len(captions) * cfg.generations * cfg.steps
        rows, scoring = [], {}
        for name, (score_fn, score_evals) in scorers.items():
            t0 = time.perf_counter()
            scores = score_fn()
            score_s = time.perf_counter() - t0
            order = np.argsort(-scores, kind="stable")
            rank = {int(i): r + 1 for r, i in enumerate(order)}
            scoring[name] = {"wall_s": score_s, "unet_evals": score_evals, "scores": scores.tolist(),
                             "ranks_of_extracted": sorted(rank[i] for i in full_prompts)}
            for fraction in args.triage_fractions:
                k = max(1, math.ceil(fraction * len(captions)))
                found_set, sub_s, _ = attack([captions[i] for i in order[:k]])
                evals = score_evals + k * cfg.generations * cfg.steps
                rows.append({"score": name, "fraction": fraction, "prompts": k, "found": len(found_set & full_set),
                             "found_share": len(found_set & full_set) / len(full_set) if full_set else float("nan"),
                             "extra_found": len(found_set - full_set), "unet_evals": evals,
                             "evals_share": evals / full_evals, "wall_s": score_s + sub_s,
                             "wall_share": (score_s + sub_s) / full_s})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = [r for r in rows if r["found_share"] >= 0.95 and r["evals_share"] <= 0.20]
    lines = [f"partially memorized model ({model.name}: {len(dup)} of 80 faces duplicated); full attack: "
             f"{len(captions)} captions x {cfg.generations} generations x {cfg.steps} steps = {full_evals:,} UNet "
             f"evaluations, {full_s:.1f} s, {len(full_set)} training faces extracted. Scoring passes, {g} generations "
             f"per caption: first-step strength ({scorers['first-step strength'][1]:,} evaluations, "
             f"{scoring['first-step strength']['wall_s']:.1f} s; the extracted captions rank "
             f"{scoring['first-step strength']['ranks_of_extracted']}); short-pass consistency, {short} steps "
             f"({scorers['short-pass consistency'][1]:,} evaluations, "
             f"{scoring['short-pass consistency']['wall_s']:.1f} s; ranks "
             f"{scoring['short-pass consistency']['ranks_of_extracted']}).",
             "",
             "| score | attacked share of captions | captions | extracted faces found | share found | UNet evaluations "
             "(scoring + attack) | share of full attack's evaluations | wall s | share of full attack's wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['score']} | {r['fraction']:.0%} | {r['prompts']} | {r['found']} of {len(full_set)} | "
                     f"**{r['found_share']:.0%}** | {r['unet_evals']:,} | **{r['evals_share']:.1%}** | "
                     f"{r['wall_s']:.1f} | {r['wall_share']:.1%} |")
    best = min(ok, key=lambda r: r["evals_share"]) if ok else None
    lines += ["", "target >= 95% found for <= 20% of the UNet evaluations: " + (
        f"met (cheapest: {best['score']}, {best['fraction']:.0%} of captions, {best['found_share']:.0%} found for "
        f"{best['evals_share']:.1%})" if ok else "MISSED")]
    return {"settings": {"model": str(model), "duplicated_faces": dup, "audit": cfg.to_dict(), "scoring_generations": g,
                         "short_pass_steps": short, "fractions": args.triage_fractions},
            "seeds": {"generation": cfg.seed}, "full_attack": {"extracted": sorted(full_set), "wall_s": full_s,
                                                               "unet_evals": full_evals},
            "scoring": scoring, "rows": rows, "met": bool(ok), "markdown": "\n".join(lines)}


# -- part: workers -------------------------------------------------------------------------------------------------


def _audit_json(out: Path) -> str:
    """results.json without what may differ between runs of one audit (wall times, the workers' count, Ray)."""
    drop = {"created_utc", "wall_time_s", "sampling_time_s", "workers", "ray_address", "ray"}

    def clean(d):
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in drop}
        if isinstance(d, list):
            return [clean(v) for v in d]
        return d

    return json.dumps(clean(json.loads((out / "results.json").read_text())), sort_keys=True)


def part_workers(args: argparse.Namespace) -> dict[str, Any]:
    """Audit wall time with 1 and 2 workers (one thread each) against 1 worker with 2 threads, and Ray's fixed cost."""
    import os
    import tempfile

    import diffusers
    import ray

    from memaudit import demo
    from memaudit.audit import AuditConfig, run_audit
    from memaudit.demo.run import DEMO_SETTINGS

    diffusers.utils.logging.disable_progress_bar()
    train = demo.faces_dataset("train")
    prompts = train.captions[: args.workers_prompts]
    settings = {**DEMO_SETTINGS, "generations": args.workers_generations, "steps": args.workers_steps,
                "min_clique": min(DEMO_SETTINGS["min_clique"], args.workers_generations),
                "batch_size": args.workers_batch_size, "quality_features": None, "alignment": None, "device": "cpu"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tmp = Path(tempfile.mkdtemp())
    before_threads = torch.get_num_threads()
    runs = [("1 worker, 1 thread (in this process)", 1, 1), ("2 Ray workers, 1 thread each", 2, 2),
            ("1 worker, 2 threads (in this process)", 1, 2)]
    rows, first_json, load = [], None, []
    try:
        # untimed warm-up: the training-feature index in the cache, the model files in the page cache
        torch.set_num_threads(1)
        run_audit(str(args.audit_model), train, tmp / "warm", prompts=prompts[:1],
                  config=AuditConfig(**{**settings, "generations": 2, "min_clique": 2, "steps": 1,
                                        "cache_dir": str(tmp / "cache")}))
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.shutdown()
        shutdown_s = time.perf_counter() - t0
        load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
        measured = {label: {"wall_s": [], "ready_s": [], "same": True} for label, _, _ in runs}
        for r in range(args.workers_repeats):  # the setups alternate, so a busy spell of the machine hits them alike
            for label, workers, threads in runs:
                torch.set_num_threads(threads)  # what --threads sets; Ray workers get threads // workers each
                out = tmp / f"w{workers}t{threads}r{r}"
                marks: dict[str, float] = {}

                def progress(stage, done, total, marks=marks):
                    if stage == "starting workers":
                        marks.setdefault("start", time.perf_counter())
                        if done == total:
                            marks["ready"] = time.perf_counter()

                t0 = time.perf_counter()
                run_audit(str(args.audit_model), train, out, prompts=prompts, progress=progress,
                          config=AuditConfig(**{**settings, "workers": workers, "cache_dir": str(tmp / "cache")}))
                measured[label]["wall_s"].append(time.perf_counter() - t0)
                if "ready" in marks:
                    measured[label]["ready_s"].append(marks["ready"] - marks["start"])
                text = _audit_json(out)
                first_json = first_json or text
                measured[label]["same"] &= text == first_json
                shutil.rmtree(out, ignore_errors=True)
                if hasattr(os, "getloadavg"):
                    load.append(os.getloadavg()[0])
        for label, workers, threads in runs:
            m = measured[label]
            rows.append({"run": label, "workers": workers, "threads_per_worker": 1 if workers > 1 else threads,
                         "wall_s": m["wall_s"], "best_s": min(m["wall_s"]),
                         "workers_ready_s": min(m["ready_s"]) if m["ready_s"] else None,
                         "same_results_as_first": m["same"]})
    finally:
        torch.set_num_threads(before_threads)
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    record = {"settings": {**settings, "prompts": len(prompts), "repeats": args.workers_repeats, "cores": cores},
              "extra_versions": {"ray": ray.__version__, "diffusers": diffusers.__version__}, "ray_init_s": init_s,
              "ray_shutdown_s": shutdown_s, "load_average_1min": load, "rows": rows}
    record["markdown"] = workers_markdown(record)
    return record


def workers_markdown(record: dict[str, Any]) -> str:
    """The table and the plain statement of a ``workers`` record (rebuilt from its numbers alone)."""
    from memaudit import demo

    st, rows, load = record["settings"], record["rows"], record["load_average_1min"]
    one, two_workers, two_threads = rows
    base = one["best_s"]
    lines = [f"{st['prompts']} prompts x {st['generations']} generations = {st['prompts'] * st['generations']} images, "
             f"{st['steps']} steps, batches of {st['batch_size']}, bundled full fine-tune ({demo.RESOLUTION} px), "
             f"{st['cores']} cores; best of {st['repeats']}, the setups alternating. A local Ray instance: `ray.init` "
             f"{record['ray_init_s']:.1f} s (and {record['ray_shutdown_s']:.1f} s to shut down)."
             + (f" The cores were shared with other jobs: 1-minute load average {min(load):.1f} to {max(load):.1f} "
                "during the runs." if load else ""), "",
             "| run | wall s (best) | all runs | vs 1 worker, 1 thread | workers' model loading s | same results.json |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ready = f"{r['workers_ready_s']:.1f}" if r["workers_ready_s"] is not None else "-"
        lines.append(f"| {r['run']} | {r['best_s']:.1f} | {_runs(r['wall_s'])} | {r['best_s'] / base:.2f} | {ready} | "
                     f"{'yes' if r['same_results_as_first'] else 'no'} |")
    fixed = record["ray_init_s"] + (two_workers["workers_ready_s"] or 0.0)
    sampled = max(0.0, two_workers["best_s"] - fixed)
    lines += ["", f"Fixed cost of Ray here: about {fixed:.0f} s (`ray.init`, then each worker importing torch and "
              "diffusers and loading its replica, on the cores the audit wants too). Without it, the two workers "
              f"took about {sampled:.0f} s, against {base:.0f} s for one worker with one thread and "
              f"{two_threads['best_s']:.0f} s for one worker with two threads. Two workers "
              f"{'gave' if two_workers['same_results_as_first'] else 'did NOT give'} the one-thread results.json bit "
              "for bit; two threads in one process "
              + ("gave it too." if two_threads["same_results_as_first"] else
                 "did not (CPU kernels round differently with another thread count)."),
              "", "Two cores cannot show a cluster's gain: the workers share the cores one process already has, and "
              "each pays its own start."
              + (" Here two threads in one process were slower than one (threads wait for each other whenever another "
                 "job holds a core)"
                 + (", so even with the fixed cost two workers of one thread each beat it" if two_workers["best_s"] <
                    two_threads["best_s"] else "")
                 + "; on idle cores two threads would be the fair rival, and at best a tie for the workers."
                 if two_threads["best_s"] > base else "")
              + " Workers pay off with a GPU (or a machine) each and an audit long enough to hide the start: the "
              "sampling time divides by the number of workers, the fixed cost does not grow with the prompts."]
    return "\n".join(lines)


# -- part: search --------------------------------------------------------------------------------------------------


def hypervolume_curve(rows: list[dict], ref: np.ndarray, inner_steps: int, steps_before: int = 0
                      ) -> list[tuple[int, float]]:
    """``(cumulative inner steps, hypervolume of the rows so far)`` after each row, both objectives minimized."""
    from pymoo.indicators.hv import HV

    from memaudit.mitigate.search import row_inner_steps

    hv, points, steps, curve = HV(ref_point=ref), [], steps_before, []
    for r in rows:
        steps += row_inner_steps(r, inner_steps)
        points.append([r["objectives"]["memorization"], r["objectives"]["quality"]])
        inside = [p for p in points if all(p[i] < ref[i] for i in range(2))]
        curve.append((steps, float(hv(np.array(inside))) if inside else 0.0))
    return curve


def part_search(args: argparse.Namespace) -> dict[str, Any]:
    """Hypervolume of the mask search's front against its total inner-loop steps: plain NSGA-II against the screen
    schedule (NSGA-II on short screening fine-tunes, then only their front trained for the full inner steps).

    Both searches are ``benchmarks/memcontrol.py``'s (SV-DIFF blocks on the bundled faces, AMD and KID, population
    8 x 5 generations, 150 inner steps); the plain one is that benchmark's own search folder when it exists. Only
    full-fidelity evaluations count toward a front. The reference point is the worst value of each objective over
    every full-fidelity evaluation of both searches plus 10% of its range."""
    from memaudit import demo
    from memaudit.mitigate.search import EvaluationLog, row_inner_steps, run_mask_search

    memcontrol = _bench_module("memcontrol")
    train = demo.faces_dataset("train")
    folders = {"plain": args.search_work / "search", "screen": args.search_work / "search-screen"}
    configs = {"plain": memcontrol.search_config(memcontrol.FULL, args.device),
               "screen": memcontrol.search_config(memcontrol.FULL, args.device, schedule="screen",
                                                  screen_steps=args.search_screen_steps,
                                                  promote=args.search_promote)}
    wall = {}
    for name, folder in folders.items():
        t0 = time.perf_counter()
        run_mask_search(str(demo.BASE_MODEL), train, folder, configs[name])  # resumes, or reads back, a finished one
        wall[name] = time.perf_counter() - t0
    plain = EvaluationLog(folders["plain"] / "evaluations.jsonl").rows
    screened = EvaluationLog(folders["screen"] / "evaluations.jsonl").rows
    promoted = EvaluationLog(folders["screen"] / "promoted.jsonl").rows
    full = np.array([[r["objectives"]["memorization"], r["objectives"]["quality"]] for r in plain + promoted])
    lo, hi = full.min(0), full.max(0)
    ref = hi + 0.1 * np.where(hi > lo, hi - lo, 1.0)
    full_steps = configs["plain"].inner_steps
    curves = {"plain": hypervolume_curve(plain, ref, full_steps),
              "screen": hypervolume_curve(promoted, ref, full_steps,
                                          steps_before=sum(row_inner_steps(r, configs["screen"].screen_steps)
                                                           for r in screened))}
    target_hv = curves["plain"][-1][1]
    plain_steps = curves["plain"][-1][0]
    rows = []
    for name, curve in curves.items():
        reach = next((st for st, hv in curve if hv >= target_hv - 1e-12), None)
        log_rows = plain if name == "plain" else screened + promoted
        rows.append({"schedule": name, "evaluations": len(log_rows), "inner_steps_total": curve[-1][0],
                     "final_hv": curve[-1][1], "hv_ratio_to_plain": curve[-1][1] / target_hv if target_hv else None,
                     "steps_to_plain_final_hv": reach,
                     "steps_share": (reach / plain_steps) if reach is not None else None,
                     "eval_wall_s": sum(r.get("wall_time_s", 0.0) for r in log_rows), "curve": curve})
    screen = rows[1]
    met = screen["steps_share"] is not None and screen["steps_share"] <= 1 / 3
    _plot_hv(curves, target_hv, HERE / "search_hypervolume.png")
    lines = [f"SV-DIFF block masks on the bundled faces, memorization = -AMD and quality = KID (demo features); "
             f"population {configs['plain'].population} x {configs['plain'].generations} generations; inner loop "
             f"{configs['plain'].inner_steps} steps; screen schedule: screening fine-tunes of "
             f"{configs['screen'].screen_steps} steps, then {configs['screen'].promote or 'all'} masks of the screening "
             f"front, spread along it, at {configs['screen'].inner_steps}. "
             f"Reference point ({ref[0]:.4f}, {ref[1]:.4f}).",
             "",
             "| schedule | evaluations | total inner steps | final hypervolume | vs plain | steps to reach plain's final "
             "hypervolume | share of plain's steps | evaluation wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "never" if r["steps_to_plain_final_hv"] is None else f"{r['steps_to_plain_final_hv']:,}"
        share = "-" if r["steps_share"] is None else f"**{r['steps_share']:.0%}**"
        lines.append(f"| {r['schedule']} | {r['evaluations']} | {r['inner_steps_total']:,} | {r['final_hv']:.4f} | "
                     f"{r['hv_ratio_to_plain']:.2f} | {reach} | {share} | {r['eval_wall_s']:.0f} |")
    at_same = max((hv for st, hv in curves["plain"] if st <= screen["inner_steps_total"]), default=0.0)
    lines += ["", f"The plain search at the screen schedule's total ({screen['inner_steps_total']:,} steps): hypervolume "
              f"{at_same:.4f} ({at_same / target_hv:.2f} of its final)."]
    lines += ["", "target: the plain search's final hypervolume at <= 1/3 of its steps: " + (
        "met" if met else f"MISSED (screen schedule ends at {screen['hv_ratio_to_plain']:.2f} of it after "
        f"{screen['inner_steps_total'] / plain_steps:.0%} of the steps)")]
    return {"settings": {name: cfg.to_dict() for name, cfg in configs.items()}, "seeds": {"search": configs["plain"].seed},
            "reference_point": ref.tolist(), "rows": rows, "met": met, "wall_s": wall,
            "plain_hv_at_screen_steps": at_same,
            "markdown": "\n".join(lines)}


def _plot_hv(curves: dict, target: float, path: Path) -> None:
    from memaudit.core.io import atomic_write_bytes
    from memaudit.report import figure_png, new_figure

    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.step([0] + [c[0] for c in curve], [0.0] + [c[1] for c in curve], where="post", label=name)
    ax.axhline(target, color="k", ls="--", lw=0.8, label="plain search's final hypervolume")
    ax.set_xlabel("total inner-loop fine-tuning steps")
    ax.set_ylabel("hypervolume of the front")
    ax.set_title("mask search: hypervolume against inner-loop steps")
    ax.legend(fontsize=8)
    atomic_write_bytes(path, figure_png(fig))


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "audit": part_audit,
    "nn": part_nn,
    "triage": part_triage,
    "search": part_search,
    "workers": part_workers,
}


# -- command line --------------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"sizes must be numbers separated by commas, like 1e4,1e5 ({e})") from e
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("give at least one positive size")
    return sizes


def _fractions(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"fractions must be numbers separated by commas, like 0.05,0.1 ({e})") from e
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("give at least one fraction, each in (0, 1]")
    return values


def _parser() -> argparse.ArgumentParser:
    from memaudit import demo

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", action="append", default=None,
                    help=f"part(s) to run: {', '.join(PARTS)} or all; repeatable or comma-separated (default all)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--json", type=Path, default=HERE / "speed.json",
                    help="JSON file to merge the records into (default benchmarks/speed.json)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (default 0)")
    g = ap.add_argument_group("audit")
    g.add_argument("--audit-model", default=str(demo.FULL_FT_MODEL))
    g.add_argument("--audit-prompts", type=int, default=20)
    g.add_argument("--audit-generations", type=int, default=10)
    g.add_argument("--audit-steps", type=int, default=25)
    g.add_argument("--audit-guidance", type=float, default=4.0)
    g.add_argument("--audit-batch-size", type=int, default=50)
    g.add_argument("--repeats", type=int, default=2, help="runs per side of the audit part; the best counts")
    g = ap.add_argument_group("nn")
    g.add_argument("--nn-sizes", type=_sizes, default=[10_000, 100_000, 1_000_000],
                   help="training set sizes, comma-separated (default 1e4,1e5,1e6)")
    g.add_argument("--nn-dim", type=int, default=64, help="feature dimension (default 64; CLIP image features: 512)")
    g.add_argument("--nn-queries", type=int, default=1000)
    g.add_argument("--nn-nprobe-high", type=int, default=64,
                   help="also search the IVF index with this nprobe (0: skip; default 64)")
    g.add_argument("--nn-repeats", type=int, default=1, help="timed runs per method and size; the best counts")
    g = ap.add_argument_group("triage")
    g.add_argument("--triage-work", type=Path, default=HERE / "zoo" / "detection",
                   help="where benchmarks/detection.py keeps the partially memorized model (built when absent)")
    g.add_argument("--triage-generations", type=int, default=4, help="generations per caption of the scoring pass")
    g.add_argument("--triage-short-steps", type=int, default=5,
                   help="sampling steps of the short-pass consistency score (default 5)")
    g.add_argument("--triage-fractions", type=_fractions,
                   default=[0.05, 0.1, 0.15, 0.2], help="shares of the captions attacked (default 0.05,0.1,0.15,0.2)")
    g = ap.add_argument_group("search")
    g.add_argument("--search-work", type=Path, default=HERE / "zoo" / "memcontrol",
                   help="benchmarks/memcontrol.py's work folder (its search is the plain one)")
    g.add_argument("--search-screen-steps", type=int, default=None,
                   help="steps of a screening fine-tune (default: inner steps / 5)")
    g.add_argument("--search-promote", type=int, default=5,
                   help="screening-front masks trained for the full inner steps, spread along the front (default 5: "
                        "40 screening fine-tunes of 30 steps plus 5 of 150 is 1,950 steps, under a third of 6,000)")
    g = ap.add_argument_group("workers")
    g.add_argument("--workers-prompts", type=int, default=16, help="training captions audited (default 16)")
    g.add_argument("--workers-generations", type=int, default=4, help="generations per prompt (default 4)")
    g.add_argument("--workers-steps", type=int, default=25, help="denoising steps (default 25)")
    g.add_argument("--workers-batch-size", type=int, default=16,
                   help="images per batch (default 16: work units of 4 prompts at 4 generations)")
    g.add_argument("--workers-repeats", type=int, default=1, help="runs of each setup; the best counts (default 1)")
    return ap


def _parts(ap: argparse.ArgumentParser, values: list[str] | None) -> list[str]:
    names: list[str] = []
    for value in values or ["all"]:
        for name in (v.strip() for v in value.split(",")):
            if not name:
                continue
            if name == "all":
                names += list(PARTS)
            elif name in PARTS:
                names.append(name)
            else:
                ap.error(f"unknown part {name!r}; choose from {', '.join(PARTS)} or all")
    return list(dict.fromkeys(names))


def _read_records(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"warning: cannot read {path} ({e}); starting a new file", file=sys.stderr)
        return {}
    if not isinstance(old, dict):
        print(f"warning: {path} does not hold a JSON object; starting a new file", file=sys.stderr)
        return {}
    return old


def main(argv: list[str] | None = None) -> int:
    from memaudit.core.errors import ConfigError
    from memaudit.core.io import atomic_write_json

    argv = sys.argv[1:] if argv is None else list(argv)
    ap = _parser()
    args = ap.parse_args(argv)
    parts = _parts(ap, args.part)
    for label, value, least in (("--repeats", args.repeats, 1), ("--nn-repeats", args.nn_repeats, 1),
                                ("--nn-queries", args.nn_queries, 1), ("--nn-dim", args.nn_dim, 1),
                                ("--audit-prompts", args.audit_prompts, 1),
                                ("--audit-generations", args.audit_generations, 1),
                                ("--audit-steps", args.audit_steps, 1), ("--audit-batch-size", args.audit_batch_size, 1),
                                ("--triage-generations", args.triage_generations, 2),  # the consistency needs pairs
                                ("--triage-short-steps", args.triage_short_steps, 1),
                                ("--search-screen-steps", args.search_screen_steps, 1),
                                ("--search-promote", args.search_promote, 1),
                                ("--workers-prompts", args.workers_prompts, 1),
                                ("--workers-generations", args.workers_generations, 2),
                                ("--workers-steps", args.workers_steps, 1), ("--workers-repeats", args.workers_repeats, 1),
                                ("--workers-batch-size", args.workers_batch_size, 1)):
        if value is not None and value < least:
            ap.error(f"{label} must be at least {least}")
    if args.nn_nprobe_high < 0:
        ap.error("--nn-nprobe-high must be 0 or more")
    command = "python benchmarks/speed.py" + (" " + shlex.join(argv) if argv else "")
    machine, vers = machine_info(args.device), versions()
    records = _read_records(args.json)
    for name in parts:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            record = PARTS[name](args)
        except ConfigError as e:  # a setting the library refuses: one line, like the options above
            ap.error(f"part {name}: {e}")
        record.update(part=name, machine=machine, versions={**vers, **record.pop("extra_versions", {})},
                      command=command, date=started)
        print(f"## {name}\n")
        print(f"machine: {machine['line']}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()))
        print(f"command: {command}\n")
        print(record["markdown"] + "\n", flush=True)
        records[name] = record
        atomic_write_json(args.json, records)  # after each part, so a later failure keeps the earlier ones
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
