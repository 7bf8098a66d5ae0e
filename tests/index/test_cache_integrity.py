"""Cache files damaged in place (same size) are never used: the feature index, the thumbnail lookup and the latent
cache each notice the damage when they read the file, say so in a warning naming it, and rebuild exactly what a
fresh build gives (only the damaged entries, for the latent cache)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from memaudit.data import load_dataset
from memaudit.index import NeighborIndex, ThumbnailLookup, build_or_load
from memaudit.latents import latent_cache_root, latents_for
from memaudit.target import load_target
from memaudit.testing import count_encodes, save_image_folder


def zero_middle(path: Path, length: int = 4096) -> None:
    """Overwrite ``length`` bytes in the middle of ``path`` with zeros, in place (same size)."""
    size = path.stat().st_size
    start = max(0, size // 2 - length // 2)
    length = min(length, size - start)
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\0" * length)
    assert path.stat().st_size == size


def features(n: int = 300, d: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# -- the neighbour index (AMD's training features) ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_a_damaged_feature_index_is_rebuilt_to_the_fresh_one(tmp_path, caplog, kind):
    train, queries = features(), features(20, seed=1)
    fresh = NeighborIndex(metric="cosine", kind=kind, nlist=4 if kind == "ivf" else None).add(train)
    want = fresh.search(queries, k=5)
    build_or_load(train, tmp_path, kind=kind, nlist=4 if kind == "ivf" else None)
    (saved,) = tmp_path.glob("index-*.faiss")
    zero_middle(saved, 8192)
    with caplog.at_level(logging.WARNING, logger="memaudit.index"):
        key = saved.stem.removeprefix("index-")
        assert NeighborIndex.load(tmp_path, key) is None
    assert str(saved) in caplog.text and "checksum" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memaudit.index"):
        rebuilt = build_or_load(train, tmp_path, kind=kind, nlist=4 if kind == "ivf" else None)
    assert str(saved) in caplog.text
    for got, exp in zip(rebuilt.search(queries, k=5), want):
        assert np.array_equal(got, exp)
    again = NeighborIndex.load(tmp_path, key)  # the rebuilt file is saved and verifies
    assert again is not None and all(np.array_equal(a, b) for a, b in zip(again.search(queries, k=5), want))


def test_metadata_damaged_into_other_valid_json_are_not_trusted(tmp_path, caplog):
    train = features()
    NeighborIndex(metric="cosine").add(train).save(tmp_path, "k1")
    meta_path = tmp_path / "index-k1.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "metric": "l2"}))  # still valid JSON, another metric
    with caplog.at_level(logging.WARNING, logger="memaudit.index"):
        assert NeighborIndex.load(tmp_path, "k1") is None
    assert str(meta_path) in caplog.text and "seal" in caplog.text
    meta_path.write_text(json.dumps(meta))  # put back: loads, and searches as before
    loaded = NeighborIndex.load(tmp_path, "k1")
    assert loaded is not None and loaded.ntotal == len(train) and meta["sha256"] and meta["bytes"] > 0


# -- the thumbnail lookup (the extraction attack's candidate index) ----------------------------------------------


def test_a_damaged_thumbnail_index_is_rebuilt_and_finds_the_same_images(tmp_path, caplog):
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    queries = (images[[3, 17, 30]] + 0.01 * torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)))

    def read(idx):
        return images[idx]

    def build() -> ThumbnailLookup:
        return ThumbnailLookup(read, images.shape[1:]).add(images)

    fresh = [build().nearest(q) for q in queries]
    assert [i for i, _ in fresh] == [3, 17, 30]
    build().save(tmp_path, "thumbs")
    faiss_file = tmp_path / "index-thumbs.faiss"
    zero_middle(faiss_file, 2048)
    with caplog.at_level(logging.WARNING, logger="memaudit.index"):
        loaded = ThumbnailLookup.load(tmp_path, "thumbs", read, images.shape[1:], n=40)
    assert loaded is None and str(faiss_file) in caplog.text
    lookup = loaded or build()  # what the audit does: build again and save
    lookup.save(tmp_path, "thumbs")
    reloaded = ThumbnailLookup.load(tmp_path, "thumbs", read, images.shape[1:], n=40)
    assert reloaded is not None
    assert [reloaded.nearest(q) for q in queries] == fresh == [lookup.nearest(q) for q in queries]


# -- the latent cache ----------------------------------------------------------------------------------------------


@pytest.fixture
def target(tiny_dir_eps):
    return load_target(tiny_dir_eps, device="cpu")


@pytest.fixture
def folder_dataset(tmp_path, make_dataset):
    data = save_image_folder(make_dataset(n=10, seed=3), tmp_path / "data")
    return load_dataset(data, 16, 3)


def chunk_files(cache: Path) -> list[Path]:
    return sorted(latent_cache_root(cache).rglob("chunk-*.npy"))


ROW_BYTES = 2 * 4 * 8 * 8 * 4  # one entry of the tiny model


def test_a_damaged_latent_entry_is_encoded_again_alone(tmp_path, target, folder_dataset, caplog):
    ds = folder_dataset
    fresh = latents_for(target, ds, tmp_path / "fresh", batch_size=4).entries(range(10))
    cache = tmp_path / "cache"
    latents_for(target, ds, cache, batch_size=4)
    chunk = chunk_files(cache)[0]
    header = chunk.stat().st_size - 10 * ROW_BYTES
    with open(chunk, "r+b") as f:  # rows 6 and 7: zeros, same size
        f.seek(header + 6 * ROW_BYTES + 100)
        f.write(b"\0" * (ROW_BYTES + 50))
    calls = count_encodes(target)
    with caplog.at_level(logging.WARNING, logger="memaudit.latents"):
        lat = latents_for(target, load_dataset(ds.source, 16, 3), cache, batch_size=4)
        assert lat.report["found"] == 10 and calls == []  # nothing read yet: the damage is not known
        got = lat.entries(range(10))
    assert calls == [2]  # the two damaged entries, encoded again together
    assert str(chunk) in caplog.text and "checksum" in caplog.text and lat.report["repaired"] == 2
    assert torch.equal(got[:6], fresh[:6]) and torch.equal(got[8:], fresh[8:])
    alone = torch.stack(target.encode_images(ds.read([6, 7])), dim=1)
    assert torch.equal(got[6:8], alone)  # the VAE's own encoding of those images
    torch.testing.assert_close(got[6:8], fresh[6:8], rtol=0, atol=1e-5)  # = fresh, up to the batch's rounding
    doc = json.loads(chunk.with_suffix(".json").read_text())
    assert doc["keys"][6] is None and doc["keys"][7] is None and all(doc["keys"][i] for i in (0, 5, 8, 9))
    calls.clear()
    later = latents_for(target, load_dataset(ds.source, 16, 3), cache, batch_size=4)
    assert later.report["encoded"] == 0 and torch.equal(later.entries(range(10)), got) and calls == []


def test_a_latent_chunk_whose_header_is_damaged_is_encoded_again(tmp_path, target, folder_dataset, caplog):
    ds = folder_dataset
    fresh = latents_for(target, ds, tmp_path / "fresh", batch_size=10).entries(range(10))
    cache = tmp_path / "cache"
    latents_for(target, ds, cache, batch_size=10).close()

    def damage_header(chunk: Path) -> None:
        with open(chunk, "r+b") as f:  # the numpy header's shape: garbage
            f.seek(20)
            f.write(b"\0" * 30)

    calls = count_encodes(target)
    # damaged after the cache was listed, before the first read: noticed by the read
    lat = latents_for(target, load_dataset(ds.source, 16, 3), cache, batch_size=10)
    (chunk,) = chunk_files(cache)
    damage_header(chunk)
    with caplog.at_level(logging.WARNING, logger="memaudit.latents"):
        assert torch.equal(lat.entries(range(10)), fresh)  # the same batch as the fresh build: the same bits
    assert str(chunk) in caplog.text and calls == [10] and lat.report["repaired"] == 10
    assert not chunk.exists() and not chunk.with_suffix(".json").exists()  # nothing of it was usable
    lat.close()
    # damaged before the cache is listed: noticed by the listing
    (new_chunk,) = [c for c in chunk_files(cache) if c != chunk]
    damage_header(new_chunk)
    caplog.clear()
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="memaudit.latents"):
        again = latents_for(target, load_dataset(ds.source, 16, 3), cache, batch_size=10)
    assert str(new_chunk.with_suffix(".json")) in caplog.text
    assert calls == [10] and again.report["encoded"] == 10
    assert torch.equal(again.entries(range(10)), fresh)


def test_a_latent_chunk_json_damaged_into_valid_json_is_not_trusted(tmp_path, target, folder_dataset, caplog):
    ds = folder_dataset
    cache = tmp_path / "cache"
    first = latents_for(target, ds, cache, batch_size=10).entries(range(10))
    doc_path = chunk_files(cache)[0].with_suffix(".json")
    doc = json.loads(doc_path.read_text())
    doc["keys"][0], doc["keys"][1] = doc["keys"][1], doc["keys"][0]  # two entries swapped: valid JSON
    doc_path.write_text(json.dumps(doc))
    calls = count_encodes(target)
    with caplog.at_level(logging.WARNING, logger="memaudit.latents"):
        again = latents_for(target, load_dataset(ds.source, 16, 3), cache, batch_size=10)
    assert str(doc_path) in caplog.text and "seal" in caplog.text
    assert calls == [10] and torch.equal(again.entries(range(10)), first)
