"""Known answers for the extraction attack (Carlini et al. 2023): tiled distance, exact maximum clique, verdicts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from memaudit.attacks.extraction import (
    ExtractionConfig,
    PromptVerdict,
    analyze_prompt,
    calibrate_edge_threshold,
    count_extracted,
    max_clique,
    medoid,
    normalized_l2,
    tiled_distances,
)
from memaudit.core.errors import ConfigError


def _naive_tiled(a: torch.Tensor, b: torch.Tensor, tiles: int) -> torch.Tensor:
    """Loop reference: explicit tile bounds (numpy.array_split sizes), per-pair per-tile normalized L2."""
    h, w = a.shape[2:]
    rows = np.array_split(np.arange(h), tiles)
    cols = np.array_split(np.arange(w), tiles)
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            best = 0.0
            for r in rows:
                for c in cols:
                    ta = a[i][:, r[0]:r[-1] + 1, c[0]:c[-1] + 1].double()
                    tb = b[j][:, r[0]:r[-1] + 1, c[0]:c[-1] + 1].double()
                    best = max(best, float((ta - tb).norm()) / math.sqrt(ta.numel()))
            out[i, j] = best
    return out


# -- distances ----------------------------------------------------------------------------------------------------


def test_tiled_distance_hand_value_is_max_over_tiles():
    a = torch.zeros(1, 1, 4, 4)
    b = a.clone()
    b[0, 0, 0, 1] = 1.0  # top-left 2x2 tile
    d = tiled_distances(a, b, tiles=2)
    assert d.shape == (1, 1)
    assert d[0, 0].item() == pytest.approx(0.5, abs=1e-12)  # sqrt(1 / 4)
    assert normalized_l2(a, b)[0, 0].item() == pytest.approx(0.25, abs=1e-12)  # sqrt(1 / 16)
    # one tile over the whole image is the whole-image normalized L2
    assert tiled_distances(a, b, tiles=1)[0, 0].item() == pytest.approx(0.25, abs=1e-12)


def test_tiled_distances_symmetric_zero_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7, 3, 12, 12, generator=g)
    d = tiled_distances(x, tiles=4)
    assert d.dtype == torch.float64 and d.shape == (7, 7)
    assert torch.equal(d, d.T)
    assert torch.all(torch.diagonal(d) == 0)
    assert torch.all(d[~torch.eye(7, dtype=torch.bool)] > 0)
    assert torch.allclose(d, tiled_distances(x, x, tiles=4), atol=1e-9)


@pytest.mark.parametrize("shape,tiles", [((3, 8, 8), 4), ((3, 10, 10), 4), ((2, 9, 7), 3), ((1, 5, 11), 4)])
def test_tiled_distances_match_naive_loop(shape, tiles):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, *shape, generator=g)
    b = torch.rand(3, *shape, generator=g)
    fast = tiled_distances(a, b, tiles=tiles)
    slow = _naive_tiled(a, b, tiles)
    assert torch.allclose(fast, slow, atol=1e-6)
    # near-duplicates: the matmul trick must not lose the small distances
    c = a + 1e-3 * torch.rand(a.shape, generator=g)
    assert torch.allclose(tiled_distances(a, c, tiles=tiles), _naive_tiled(a, c, tiles), atol=1e-6)


def test_normalized_l2_matches_definition():
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 3, 6, 5, generator=g), torch.rand(2, 3, 6, 5, generator=g)
    ref = torch.tensor([[float((x - y).double().norm()) / math.sqrt(90) for y in b] for x in a], dtype=torch.float64)
    assert torch.allclose(normalized_l2(a, b), ref, atol=1e-9)
    assert torch.all(torch.diagonal(normalized_l2(a)) == 0)


def test_distance_errors():
    with pytest.raises(ConfigError, match="tiles"):
        tiled_distances(torch.rand(2, 1, 3, 3), tiles=4)
    with pytest.raises(ConfigError):
        tiled_distances(torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError):
        tiled_distances(torch.rand(1, 8, 8))


# -- maximum clique -----------------------------------------------------------------------------------------------


def _adj(n: int, edges) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        a[i, j] = a[j, i] = True
    return a


def _brute_force_size(a: np.ndarray) -> int:
    n = len(a)
    for size in range(n, 0, -1):
        for sub in itertools.combinations(range(n), size):
            if all(a[i, j] for i, j in itertools.combinations(sub, 2)):
                return size
    return 0


def _is_clique(a: np.ndarray, nodes) -> bool:
    return all(a[i, j] for i, j in itertools.combinations(nodes, 2))


def test_max_clique_path_is_not_the_component():
    a = _adj(6, [(i, i + 1) for i in range(5)])
    c = max_clique(a)
    assert len(c) == 2 and _is_clique(a, c)


def test_max_clique_two_triangles_joined_by_an_edge():
    a = _adj(6, [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)])
    c = max_clique(a)
    assert len(c) == 3 and c in ([0, 1, 2], [3, 4, 5])


def test_max_clique_five_clique_among_pendants():
    five = list(range(5))
    four = list(range(5, 9))
    edges = list(itertools.combinations(five, 2)) + list(itertools.combinations(four, 2))
    edges += [(0, 9), (9, 10), (5, 11), (11, 12), (12, 13), (4, 5)]  # pendants and a bridge
    a = _adj(14, edges)
    assert max_clique(a) == five
    assert max_clique(torch.as_tensor(a)) == five  # a tensor works too


def test_max_clique_trivial_graphs():
    assert max_clique(np.zeros((0, 0), dtype=bool)) == []
    assert max_clique(np.zeros((4, 4), dtype=bool)) == [0]
    assert max_clique(np.eye(3, dtype=bool)) == [0]  # the diagonal is ignored
    assert max_clique(np.ones((50, 50), dtype=bool)) == list(range(50))
    with pytest.raises(ConfigError, match="symmetric"):
        max_clique(np.triu(np.ones((3, 3), dtype=bool), 1))
    with pytest.raises(ConfigError, match="max_clique_nodes"):
        max_clique(np.zeros((5, 5), dtype=bool), max_nodes=4)


def test_max_clique_matches_brute_force_on_random_graphs():
    rng = np.random.default_rng(0)
    for trial in range(30):
        p = rng.uniform(0.2, 0.9)
        upper = np.triu(rng.random((9, 9)) < p, 1)
        a = upper | upper.T
        c = max_clique(a)
        assert c == sorted(set(c)) and _is_clique(a, c), trial
        assert len(c) == _brute_force_size(a), trial


def test_max_clique_matches_networkx_on_larger_graphs():
    import networkx as nx
    from networkx.algorithms.clique import max_weight_clique

    rng = np.random.default_rng(1)
    for trial in range(15):
        n = int(rng.integers(15, 35))
        p = rng.uniform(0.1, 0.95)
        upper = np.triu(rng.random((n, n)) < p, 1)
        a = upper | upper.T
        c = max_clique(a)
        _, size = max_weight_clique(nx.from_numpy_array(a.astype(int)), weight=None)
        assert _is_clique(a, c) and len(c) == size, trial


def test_max_clique_near_complete_graph_is_fast_and_exact():
    # a memorized prompt: 300 near-duplicates (a few missing edges) and 100 scattered generations
    rng = np.random.default_rng(2)
    n = 400
    upper = np.triu(rng.random((n, n)) < 0.02, 1)
    a = upper | upper.T
    a[:300, :300] = True
    for i, j in [(3, 7), (10, 11), (10, 12), (200, 250)]:
        a[i, j] = a[j, i] = False
    c = max_clique(a, max_steps=100_000)
    assert len(c) == 300 - 3 and _is_clique(a, c)


def test_max_clique_step_budget():
    rng = np.random.default_rng(3)
    upper = np.triu(rng.random((60, 60)) < 0.5, 1)
    with pytest.raises(ConfigError, match="max_clique_steps"):
        max_clique(upper | upper.T, max_steps=1)


def test_medoid():
    pts = torch.tensor([0.0, 1.0, 2.0, 10.0])
    d = (pts[:, None] - pts[None, :]).abs()
    assert medoid([0, 1, 2], d) == 1
    assert medoid([2, 3], d) == 2  # tie: the first
    assert medoid([3], d) == 3


# -- the attack ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(8, 3, 16, 16, generator=g)


def _copies(image: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (image[None] + 1e-3 * torch.randn(n, *image.shape, generator=g)).clamp(0, 1)


def test_fake_target_is_flagged_and_extracted(train_images):
    gens = _copies(train_images[3], 12, seed=4)
    cfg = ExtractionConfig()
    for own in (None, 3):
        v = analyze_prompt(gens, cfg, train_images, own_index=own)
        assert v.flagged and v.extracted
        assert v.clique_size == 12 and v.clique == list(range(12))
        assert v.nearest_train_index == 3
        assert v.nearest_train_distance < 0.01
        assert v.medoid in v.clique
    v = analyze_prompt(gens, cfg, train_images, own_index=5)
    assert v.flagged and not v.extracted
    assert v.nearest_train_index == 5 and v.nearest_train_distance > cfg.delta


def test_noise_prompt_is_not_flagged(train_images):
    g = torch.Generator().manual_seed(5)
    gens = torch.rand(12, 3, 16, 16, generator=g)
    v = analyze_prompt(gens, ExtractionConfig(), train_images)
    assert not v.flagged and not v.extracted
    assert v.clique_size < ExtractionConfig().min_clique
    assert v.nearest_train_index is not None  # still reported for the largest clique's medoid


def test_flagging_needs_a_clique_not_a_chain():
    # a chain of generations, each close to the next but far from the ones two steps away: one connected
    # component of 12, but no large clique
    base = torch.zeros(12, 1, 4, 4)
    for i in range(12):
        base[i] = i * 0.06
    cfg = ExtractionConfig(tiles=1, edge_threshold=0.1, min_clique=3)
    v = analyze_prompt(base, cfg)
    assert v.clique_size == 2 and not v.flagged
    assert v.nearest_train_index is None and v.nearest_train_distance is None


def test_mixed_prompt_clique_members(train_images):
    g = torch.Generator().manual_seed(6)
    gens = torch.cat([torch.rand(5, 3, 16, 16, generator=g), _copies(train_images[1], 10, seed=7)])
    v = analyze_prompt(gens, ExtractionConfig(), train_images)
    assert v.clique == list(range(5, 15)) and v.flagged and v.extracted and v.nearest_train_index == 1


def test_analyze_prompt_takes_a_lookup_and_gives_the_same_verdict(train_images):
    from memaudit.index import ExhaustiveLookup, ThumbnailLookup

    thumbs = ThumbnailLookup(lambda idx: train_images[idx], (3, 16, 16)).add(train_images)
    cfg = ExtractionConfig()
    noise = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    for gens in (_copies(train_images[6], 12, seed=9), noise):
        for own in (None, 2):
            v = analyze_prompt(gens, cfg, train_images, own_index=own)
            assert analyze_prompt(gens, cfg, thumbs, own_index=own) == v
            assert analyze_prompt(gens, cfg, ExhaustiveLookup(train_images), own_index=own) == v
            ref = normalized_l2(gens[v.medoid:v.medoid + 1], train_images)[0]
            assert v.nearest_train_index == (own if own is not None else int(torch.argmin(ref)))
            assert v.nearest_train_distance == pytest.approx(float(ref[v.nearest_train_index]), abs=1e-9)
    assert analyze_prompt(_copies(train_images[6], 12, seed=9), cfg, thumbs).nearest_train_index == 6


def test_analyze_prompt_errors(train_images):
    gens = _copies(train_images[0], 4, seed=8)
    with pytest.raises(ConfigError, match="training images are 1x16x16 but generations are 3x16x16"):
        analyze_prompt(gens, ExtractionConfig(), train_images[:, :1])
    with pytest.raises(ConfigError, match="training images are 3x8x8"):
        analyze_prompt(gens, ExtractionConfig(), train_images[:, :, :8, :8])
    with pytest.raises(ConfigError, match="own_index"):
        analyze_prompt(gens, ExtractionConfig(), train_images, own_index=99)
    with pytest.raises(ConfigError, match="max_clique_nodes"):
        analyze_prompt(gens, ExtractionConfig(max_clique_nodes=3), train_images)


@pytest.mark.parametrize("kw", [{"tiles": 0}, {"edge_threshold": 0.0}, {"edge_threshold": float("nan")},
                                {"min_clique": 1}, {"delta": -1.0}, {"max_clique_nodes": 0},
                                {"max_clique_steps": 0}])
def test_config_validation(kw):
    with pytest.raises(ConfigError, match="extraction setting invalid"):
        ExtractionConfig(**kw)


def _verdict(extracted: bool, index: int | None) -> PromptVerdict:
    return PromptVerdict(clique=[0], clique_size=1, flagged=extracted, medoid=0, nearest_train_index=index,
                         nearest_train_distance=0.0 if index is not None else None, extracted=extracted)


def test_count_extracted_counts_distinct_images():
    verdicts = [_verdict(True, 3), _verdict(True, 3), _verdict(True, 4), _verdict(False, 5), _verdict(False, None)]
    assert count_extracted(verdicts) == 2
    assert count_extracted(verdicts, own_indices=[3, 7, 4, 5, None]) == 3
    assert count_extracted([]) == 0
    with pytest.raises(ConfigError, match="own_indices"):
        count_extracted(verdicts, own_indices=[1])


def test_calibrate_edge_threshold():
    g = torch.Generator().manual_seed(9)
    prompts = [torch.rand(6, 3, 8, 8, generator=g) for _ in range(4)]
    pooled = np.concatenate([tiled_distances(p, tiles=4)[np.triu_indices(6, 1)].numpy() for p in prompts])
    t0 = calibrate_edge_threshold(prompts, tiles=4, quantile=0.0)
    assert t0 <= pooled.min()
    assert (pooled < t0).sum() == 0  # joins no non-memorized pair
    values = [calibrate_edge_threshold(prompts, tiles=4, quantile=q) for q in (0.0, 0.01, 0.1, 0.5, 1.0)]
    assert values == sorted(values) and values[-1] == pytest.approx(pooled.max())
    t = calibrate_edge_threshold(prompts, tiles=4, quantile=0.1)
    assert (pooled < t).mean() <= 0.1
    with pytest.raises(ConfigError, match="at least 2 generations"):
        calibrate_edge_threshold([torch.rand(1, 3, 8, 8)], tiles=4)
    with pytest.raises(ConfigError, match="quantile"):
        calibrate_edge_threshold(prompts, quantile=1.5)


def test_step_limit_falls_back_to_a_greedy_clique(monkeypatch):
    """When the exact search gives up, the verdict uses a greedy clique (a true clique) and says it is not exact."""
    import memaudit.attacks.extraction as ex

    def give_up(*args, **kwargs):
        raise ConfigError("exceeded max_clique_steps=1")

    monkeypatch.setattr(ex, "max_clique", give_up)
    g = torch.Generator().manual_seed(0)
    train_images = torch.rand(5, 3, 16, 16, generator=g)
    gens = (train_images[3:4].repeat(12, 1, 1, 1) + 1e-3 * torch.randn(12, 3, 16, 16, generator=g)).clamp(0, 1)
    v = analyze_prompt(gens, ExtractionConfig(), train_images)
    assert v.clique_exact is False
    assert v.clique_size == 12 and v.flagged and v.extracted and v.nearest_train_index == 3
    exact = ex.PromptVerdict(clique=[0], clique_size=1, flagged=False, medoid=0, nearest_train_index=None,
                             nearest_train_distance=None, extracted=False)
    assert exact.clique_exact is True
