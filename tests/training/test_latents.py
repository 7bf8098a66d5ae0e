"""The latent cache (memaudit.latents): entries equal the VAE's own encoding, are found again by every later run and
by subsets, are encoded again only for what changed (an image file, the VAE, the resolution), and a build that
fails or is interrupted leaves no half-written entry."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from memaudit.core.errors import DataError
from memaudit.data import load_dataset
from memaudit.latents import latent_cache_root, latents_for
from memaudit.target import load_target
from memaudit.testing import count_encodes, save_image_folder

ENTRY_BYTES = 2 * 4 * 8 * 8 * 4  # mean and std of a 4x8x8 float32 latent: one entry of the tiny model


def png_folder(path, dataset):
    return save_image_folder(dataset, path)


def cache_files(cache) -> list[str]:
    root = latent_cache_root(cache)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


@pytest.fixture
def target(tiny_dir_eps):
    return load_target(tiny_dir_eps, device="cpu")


def test_entries_equal_the_vaes_encoding_and_are_found_the_second_time(tmp_path, target, tiny_dataset):
    cache = tmp_path / "cache"
    calls = count_encodes(target)
    first = latents_for(target, tiny_dataset, cache)
    assert calls == [8]
    assert first.report | {"wall_time_s": 0} == {
        "status": "built", "path": first.report["path"], "images": 8, "found": 0, "encoded": 8, "chunks_written": 1,
        "vae_sha256": first.report["vae_sha256"], "resolution": 16, "device": "cpu", "wall_time_s": 0}
    assert first.report["path"].startswith(str(cache / "latents")) and first.report["path"].endswith("-16px-cpu")
    mean, std = target.encode_images(tiny_dataset.images)
    got_mean, got_std = first.mean_std(range(8))
    assert torch.equal(got_mean, mean) and torch.equal(got_std, std)  # bit for bit
    assert torch.equal(first.means(), mean)
    calls.clear()
    again = latents_for(target, tiny_dataset, cache)
    assert calls == []  # nothing encoded
    assert (again.report["status"], again.report["found"], again.report["encoded"]) == ("reused", 8, 0)
    assert torch.equal(again.mean_std([5, 2])[0], mean[[5, 2]])
    # one chunk: its array and its key list
    assert [f.split("/")[1].rsplit(".", 1)[1] for f in cache_files(cache)] == ["json", "npy"]


def test_sample_is_mean_plus_std_times_the_generators_noise(tmp_path, target, tiny_dataset):
    lat = latents_for(target, tiny_dataset, tmp_path)
    idx = torch.tensor([3, 0, 3])
    x = lat.sample(idx, torch.Generator().manual_seed(7))
    mean, std = target.encode_images(tiny_dataset.images)
    noise = torch.randn((3, *target.latent_shape), generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, mean[idx] + std[idx] * noise)


def test_a_subset_finds_the_sets_entries(tmp_path, target, tiny_dataset):
    full = latents_for(target, tiny_dataset, tmp_path)
    calls = count_encodes(target)
    part = latents_for(target, tiny_dataset.subset([6, 1, 4]), tmp_path)
    assert calls == [] and part.report["found"] == 3 and part.report["status"] == "reused"
    assert torch.equal(part.entries([0, 1, 2]), full.entries([6, 1, 4]))


def test_a_changed_image_file_is_the_only_one_encoded_again(tmp_path, target, make_dataset):
    data = png_folder(tmp_path / "data", make_dataset(n=10, seed=1))
    cache = tmp_path / "cache"
    calls = count_encodes(target)
    ds = load_dataset(data, 16, 3)
    assert ds.images is None
    latents_for(target, ds, cache)
    assert calls == [10]
    # replace image 4 (other pixels, another modification time)
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / "4.png")
    st = os.stat(data / "4.png")
    os.utime(data / "4.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()
    changed = load_dataset(data, 16, 3)
    lat = latents_for(target, changed, cache)
    assert calls == [1]
    assert (lat.report["status"], lat.report["found"], lat.report["encoded"]) == ("updated", 9, 1)
    mean, std = target.encode_images(changed.read([4]))
    assert torch.equal(lat.mean_std([4])[0], mean) and torch.equal(lat.mean_std([4])[1], std)
    calls.clear()
    assert latents_for(target, load_dataset(data, 16, 3), cache).report["encoded"] == 0 and calls == []


def test_a_changed_vae_or_resolution_encodes_every_image_again(tmp_path, target, tiny_dataset, data_dir):
    from memaudit.testing import save_tiny_pipeline

    cache = tmp_path / "cache"
    before = latents_for(target, tiny_dataset, cache)
    with torch.no_grad():
        next(iter(target.vae.parameters())).view(-1)[0] += 1e-3  # one weight of the VAE
    calls = count_encodes(target)
    after = latents_for(target, tiny_dataset, cache)
    assert calls == [8] and after.report["status"] == "built" and after.report["path"] != before.report["path"]
    assert after.report["vae_sha256"] != before.report["vae_sha256"]
    assert not torch.equal(after.means(), before.means())
    # the same VAE weights at 32 px (the tiny pipeline's VAE does not depend on the resolution): new entries
    big = load_target(save_tiny_pipeline(tmp_path / "p32", resolution=32), device="cpu")
    small = load_target(save_tiny_pipeline(tmp_path / "p16", resolution=16), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(big.vae.state_dict().values(), small.vae.state_dict().values()))
    at16 = latents_for(small, load_dataset(data_dir, 16, 3), cache)
    calls = count_encodes(big)
    at32 = latents_for(big, load_dataset(data_dir, 32, 3), cache)
    assert calls == [8] and at32.report["status"] == "built" and at32.report["path"].endswith("-32px-cpu")
    assert at32.means().shape == (8, 4, 16, 16) and at16.means().shape == (8, 4, 8, 8)
    assert latents_for(small, load_dataset(data_dir, 16, 3), cache).report["status"] == "reused"  # still there


class Interrupted(Exception):
    pass


def test_an_interrupted_build_keeps_its_whole_chunks_and_ends_as_an_uninterrupted_one(tmp_path, target, make_dataset):
    ds = make_dataset(n=10, seed=2)
    whole = latents_for(target, ds, tmp_path / "whole", batch_size=2, chunk_bytes=4 * ENTRY_BYTES)
    assert whole.report["chunks_written"] == 3  # 4 + 4 + 2 entries
    cache = tmp_path / "cut"

    def stop_after_6(done, total):
        if done >= 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        latents_for(target, ds, cache, batch_size=2, chunk_bytes=4 * ENTRY_BYTES, progress=stop_after_6)
    files = cache_files(cache)
    assert len(files) == 2 and not any(".tmp" in f for f in files)  # the first chunk; the second is gone
    again = latents_for(target, ds, cache, batch_size=2, chunk_bytes=4 * ENTRY_BYTES)
    assert (again.report["found"], again.report["encoded"]) == (4, 6)
    # the remaining images were encoded in the batches an uninterrupted build used: the very same bits
    assert torch.equal(again.entries(range(10)), whole.entries(range(10)))


def test_an_unreadable_image_stops_the_build_with_one_line_and_writes_nothing(tmp_path, target, make_dataset):
    data = png_folder(tmp_path / "data", make_dataset(n=10, seed=3))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "7.png")
    cut = (data / "7.png").read_bytes()
    (data / "7.png").write_bytes(cut[: len(cut) // 2])  # the header is intact: only decoding fails
    ds = load_dataset(data, 16, 3)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        latents_for(target, ds, cache, batch_size=4)
    assert "7.png" in str(e.value) and "\n" not in str(e.value)
    assert cache_files(cache) == []  # no chunk, no temporary file


def test_a_damaged_chunk_is_ignored_and_its_images_encoded_again(tmp_path, target, tiny_dataset):
    first = latents_for(target, tiny_dataset, tmp_path).entries(range(8))
    npy = next(latent_cache_root(tmp_path).rglob("chunk-*.npy"))
    npy.write_bytes(npy.read_bytes()[:-100])  # cut short
    calls = count_encodes(target)
    again = latents_for(target, tiny_dataset, tmp_path)
    assert calls == [8] and again.report["encoded"] == 8
    assert torch.equal(again.entries(range(8)), first)
    doc = next(latent_cache_root(tmp_path).rglob("chunk-*.json"))
    assert json.loads(doc.read_text())["kind"] == "memaudit.latents"


def test_encode_batches_shrink_with_the_resolution():
    from memaudit.latents import encode_batch_size

    assert [encode_batch_size(r) for r in (16, 32, 128, 256, 512, 1024, 4096)] == [64, 64, 64, 16, 4, 1, 1]
