"""Neighbour index: known nearest neighbours and distances, IVF vs exact, the on-disk cache, input errors."""

from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.index import IVF_TRAIN_PER_CELL, NeighborIndex, build_or_load, index_key, ivf_training_rows


def test_exact_cosine_known_answer():
    index = NeighborIndex(metric="cosine", kind="exact").add(np.array([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
    assert index.ntotal == 3 and index.dim == 2 and index.kind == "exact"
    distances, indices = index.search(np.array([[2.0, 0.0]]), k=3)  # scale must not matter for cosine
    assert indices.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(distances[0], [1 - 1 / math.sqrt(2), 1.0, 2.0], atol=1e-6)
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_exact_l2_returns_real_distances():
    index = NeighborIndex(metric="l2", kind="exact").add(torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]]))
    distances, indices = index.search(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), k=2)
    assert indices.tolist() == [[0, 1], [0, 1]]
    np.testing.assert_allclose(distances, [[0.0, 5.0], [3.0, 4.0]], atol=1e-5)


def _clustered(n: int, d: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d)) * 3
    return (centers[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_with_all_cells_probed_matches_exact(metric):
    data = _clustered(2000)
    queries = _clustered(100, seed=1)
    exact = NeighborIndex(metric=metric, kind="exact").add(data)
    ivf = NeighborIndex(metric=metric, kind="ivf", nlist=20, nprobe=20).add(data)
    assert ivf.kind == "ivf" and ivf.nlist == 20
    d_exact, i_exact = exact.search(queries, k=3)
    d_ivf, i_ivf = ivf.search(queries, k=3)
    np.testing.assert_array_equal(i_ivf, i_exact)
    np.testing.assert_allclose(d_ivf, d_exact, rtol=1e-5, atol=1e-5)
    # with one cell probed the search is approximate: it must differ from exact for some queries on this data
    ivf.nprobe = 1
    assert ivf.nprobe == 1
    _, i_one = ivf.search(queries, k=3)
    assert (i_one != i_exact).any()


def test_auto_picks_ivf_from_threshold():
    data = _clustered(400)
    assert NeighborIndex(kind="auto", ivf_threshold=500).add(data).kind == "exact"
    auto = NeighborIndex(kind="auto", ivf_threshold=400).add(data)
    assert auto.kind == "ivf" and auto.nlist == 400 // 39  # default nlist capped so k-means has 39 points/cell


def test_save_load_round_trip(tmp_path):
    data = _clustered(500)
    queries = _clustered(20, seed=2)
    for kind in ("exact", "ivf"):
        index = NeighborIndex(metric="cosine", kind=kind, nlist=8, nprobe=8).add(data)
        path = index.save(tmp_path, f"k-{kind}")
        assert path == tmp_path / f"index-k-{kind}.faiss" and path.is_file()
        meta = json.loads((tmp_path / f"index-k-{kind}.json").read_text())
        assert meta["metric"] == "cosine" and meta["kind"] == kind and meta["dim"] == 16 and meta["ntotal"] == 500
        assert meta["key"] == f"k-{kind}"
        loaded = NeighborIndex.load(tmp_path, f"k-{kind}")
        assert loaded is not None and loaded.kind == kind and loaded.metric == "cosine" and loaded.ntotal == 500
        for a, b in zip(index.search(queries, k=4), loaded.search(queries, k=4)):
            np.testing.assert_array_equal(a, b)
    assert NeighborIndex.load(tmp_path, "another-key") is None
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


def test_load_rejects_mismatching_metadata(tmp_path):
    NeighborIndex().add(_clustered(50)).save(tmp_path, "abc")
    meta_path = tmp_path / "index-abc.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(dict(meta, ntotal=49)))
    assert NeighborIndex.load(tmp_path, "abc") is None
    meta_path.write_text(json.dumps(dict(meta, key="other")))
    assert NeighborIndex.load(tmp_path, "abc") is None
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "index-abc.faiss").write_bytes(b"garbage")
    assert NeighborIndex.load(tmp_path, "abc") is None


def test_build_or_load_reuses_the_saved_index(tmp_path, monkeypatch):
    data = _clustered(300)
    writes = []
    real_write = faiss.write_index
    monkeypatch.setattr(faiss, "write_index", lambda index, path: (writes.append(path), real_write(index, path)))

    first = build_or_load(data, tmp_path, metric="cosine")
    assert len(writes) == 1
    saved = list(tmp_path.glob("index-*.faiss"))
    assert len(saved) == 1
    mtime = saved[0].stat().st_mtime_ns

    second = build_or_load(torch.from_numpy(data.copy()), tmp_path, metric="cosine")
    assert len(writes) == 1 and saved[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    q = _clustered(10, seed=3)
    for a, b in zip(first.search(q, k=2), second.search(q, k=2)):
        np.testing.assert_array_equal(a, b)

    build_or_load(data, tmp_path, metric="l2")  # another metric: another key, a new index
    data2 = data.copy()
    data2[0, 0] += 1
    build_or_load(data2, tmp_path, metric="cosine")  # other features: another key
    assert len(writes) == 3 and len(list(tmp_path.glob("index-*.faiss"))) == 3
    assert build_or_load(data, None).ntotal == 300 and len(writes) == 3  # no folder: nothing saved


def test_index_key_depends_on_data_metric_and_extra():
    data = _clustered(10)
    key = index_key(data, "cosine")
    assert len(key) == 16 and int(key, 16) >= 0
    assert index_key(torch.from_numpy(data), "cosine") == key
    assert index_key(data, "l2") != key
    assert index_key(data, "cosine", extra="kind=ivf") != key
    assert index_key(data[:9], "cosine") != key


def test_input_errors():
    index = NeighborIndex().add(np.eye(3, dtype=np.float32))
    with pytest.raises(ConfigError, match="dimension 4"):
        index.search(np.ones((1, 4)), k=1)
    with pytest.raises(ConfigError, match="dimension 2"):
        index.add(np.ones((2, 2)))
    with pytest.raises(ConfigError, match="empty"):
        NeighborIndex().add(np.zeros((0, 3)))
    with pytest.raises(ConfigError, match="NaN"):
        NeighborIndex().add(np.array([[1.0, float("nan")]]))
    with pytest.raises(ConfigError, match="NaN"):
        index.search(np.array([[1.0, float("inf"), 0.0]]))
    with pytest.raises(ConfigError, match="empty"):
        NeighborIndex().search(np.ones((1, 3)))
    with pytest.raises(ConfigError, match="k=4"):
        index.search(np.ones((1, 3)), k=4)
    with pytest.raises(ConfigError, match="metric"):
        NeighborIndex(metric="manhattan")
    with pytest.raises(ConfigError, match="kind"):
        NeighborIndex(kind="hnsw")
    with pytest.raises(ConfigError, match="nlist"):
        NeighborIndex(kind="ivf", nlist=10).add(np.ones((5, 3)))


def test_cuda_without_gpu_faiss_falls_back_to_cpu(caplog, monkeypatch):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    with caplog.at_level("WARNING", logger="memaudit.index"):
        index = NeighborIndex(device="cuda").add(np.eye(2, dtype=np.float32))
    assert "GPU support" in caplog.text
    assert index.search(np.array([[1.0, 0.0]]))[1].tolist() == [[0]]


def test_default_nprobe_grows_with_the_cells():
    from memaudit.index import NeighborIndex, default_nprobe

    assert [default_nprobe(n) for n in (1, 256, 1024, 1025, 4000)] == [16, 16, 16, 17, 63]
    data = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    assert NeighborIndex(kind="ivf").nprobe is None  # not known before the number of cells is
    index = NeighborIndex(kind="ivf").add(data)  # 400 vectors: nlist = min(4 * sqrt(400), 400 // 39) = 10
    assert index.nlist == 10 and index.nprobe == 16 and index._index.nprobe == 10  # capped at nlist: exhaustive
    assert NeighborIndex(kind="ivf", nlist=10, nprobe=3).add(data)._index.nprobe == 3


# -- building from batches -----------------------------------------------------------------------------------------


def _stream(index: NeighborIndex, data: np.ndarray, batch: int, spill_dir=None) -> NeighborIndex:
    stream = index.stream(len(data), spill_dir=spill_dir)
    for start in range(0, len(data), batch):
        stream.add(data[start:start + batch])
    return stream.finish()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_streamed_in_batches_equals_the_index_built_at_once(metric, tmp_path):
    # 9,000 vectors, 30 cells: the training sample (30 * 64 = 1,920 rows, drawn over the whole set) ends late, so the
    # stream spills most vectors before training, and the adds cross the 4,096-row chunks
    data = _clustered(9000, clusters=40)
    queries = _clustered(300, clusters=40, seed=1)
    whole = NeighborIndex(metric=metric, kind="ivf", nlist=30, nprobe=2).add(data)
    rows = ivf_training_rows(9000, 30, seed=0)
    assert len(rows) == 30 * IVF_TRAIN_PER_CELL and rows[-1] > 8000  # a sample of the set, not its first batch
    for batch in (37, 64, 5000):
        streamed = _stream(NeighborIndex(metric=metric, kind="ivf", nlist=30, nprobe=2), data, batch, tmp_path)
        assert streamed.kind == "ivf" and streamed.nlist == 30 and streamed.ntotal == 9000
        np.testing.assert_array_equal(streamed.vectors(), whole.vectors())
        for a, b in zip(whole.search(queries, k=5), streamed.search(queries, k=5)):
            np.testing.assert_array_equal(a, b)  # same cells, same assignments: the same neighbours and distances
        assert not list(tmp_path.iterdir())  # the spill file is gone
    # trained on the first batch only (what a plain add() of batches would do), the cells differ
    first_only = NeighborIndex(metric=metric, kind="ivf", nlist=30, nprobe=2).add(data[:64 * 30])
    first_only.add(data[64 * 30:])
    assert not np.array_equal(first_only.search(queries, k=5)[1], whole.search(queries, k=5)[1])


def test_stream_decides_the_kind_from_the_total_and_checks_the_count():
    data = _clustered(600)
    assert _stream(NeighborIndex(kind="auto", ivf_threshold=601), data, 50).kind == "exact"
    auto = _stream(NeighborIndex(kind="auto", ivf_threshold=600), data, 50)  # each batch is far below the threshold
    assert auto.kind == "ivf" and auto.nlist == 600 // 39
    exact = _stream(NeighborIndex(kind="exact"), data, 7)
    np.testing.assert_array_equal(exact.vectors(), NeighborIndex(kind="exact").add(data).vectors())
    over = NeighborIndex().stream(600)
    for start in range(0, 600, 50):
        over.add(data[start:start + 50])
    with pytest.raises(ConfigError, match="opened for 600 vectors but 650"):
        over.add(data[:50])
    short = NeighborIndex(kind="ivf", nlist=4).stream(600)
    short.add(data[:100])
    with pytest.raises(ConfigError, match="opened for 600 vectors but 100 were added"):
        short.finish()
    with pytest.raises(ConfigError, match="already holds"):
        NeighborIndex().add(data).stream(10)
    with pytest.raises(ConfigError, match="total"):
        NeighborIndex().stream(0)
