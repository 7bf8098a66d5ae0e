"""AMD: faiss result equals the brute-force reference and an independent computation; streaming equals one shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.index import NeighborIndex
from memaudit.metrics.amd import AMDAccumulator, AMDResult, amd, amd_bruteforce


def _independent_amd(gen: np.ndarray, train: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    gen, train = gen.astype(np.float64), train.astype(np.float64)
    g = gen / np.linalg.norm(gen, axis=1, keepdims=True)
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    sims = g @ t.T
    per = 1.0 - sims.max(axis=1)
    return float(per.mean()), per, sims.argmax(axis=1)


def test_amd_matches_bruteforce_and_independent_numpy():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 32)).astype(np.float32)
    gen = rng.normal(size=(50, 32)).astype(np.float32)
    result = amd(torch.from_numpy(gen), torch.from_numpy(train))
    reference = amd_bruteforce(gen, train, chunk=16)  # small chunks exercise the chunked loop
    expected, per, nearest = _independent_amd(gen, train)

    assert isinstance(result, AMDResult) and len(result) == 50
    assert result.amd == pytest.approx(expected, abs=1e-5)
    assert reference.amd == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(result.per_image, per, atol=1e-5)
    np.testing.assert_allclose(reference.per_image, per, atol=1e-12)
    np.testing.assert_array_equal(result.nearest, nearest)
    np.testing.assert_array_equal(reference.nearest, nearest)
    assert 0.3 < result.amd < 1.0  # random 32-d vectors are far apart: guards against a trivial 0


def test_copies_of_training_images_give_zero_amd_and_the_right_rows():
    rng = np.random.default_rng(1)
    train = rng.random(size=(40, 8)).astype(np.float32)
    rows = np.array([7, 3, 39, 0, 3])
    gen = train[rows] * np.array([[1.0], [2.0], [0.5], [1.0], [3.0]], dtype=np.float32)  # scaled copies
    for result in (amd(gen, train), amd_bruteforce(gen, train)):
        assert result.amd == pytest.approx(0.0, abs=1e-6)
        np.testing.assert_array_equal(result.nearest, rows)


def test_accumulator_in_three_batches_equals_one_shot():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(200, 16)).astype(np.float32)
    gen = rng.normal(size=(23, 16)).astype(np.float32)
    index = NeighborIndex(metric="cosine").add(train)
    one_shot = amd(gen, index=index)

    acc = AMDAccumulator(index)
    batch_distances = [acc.update(batch) for batch in (gen[:5], torch.from_numpy(gen[5:17]), gen[17:])]
    assert [len(b) for b in batch_distances] == [5, 12, 6] and acc.count == 23
    np.testing.assert_array_equal(np.concatenate(batch_distances), one_shot.per_image)
    streamed = acc.result()
    assert streamed.amd == pytest.approx(one_shot.amd, abs=1e-12)
    np.testing.assert_array_equal(streamed.per_image, one_shot.per_image)
    np.testing.assert_array_equal(streamed.nearest, one_shot.nearest)


def test_amd_argument_errors():
    train = np.eye(3, dtype=np.float32)
    index = NeighborIndex(metric="cosine").add(train)
    with pytest.raises(ConfigError, match="exactly one"):
        amd(train)
    with pytest.raises(ConfigError, match="exactly one"):
        amd(train, train, index=index)
    with pytest.raises(ConfigError, match="cosine"):
        amd(train, index=NeighborIndex(metric="l2").add(train))
    with pytest.raises(ConfigError, match="dimension"):
        amd(np.ones((2, 4)), train)
    with pytest.raises(ConfigError, match="dimension"):
        amd_bruteforce(np.ones((2, 4)), train)
    with pytest.raises(ConfigError, match="update"):
        AMDAccumulator(index).result()
