"""An audit whose memory does not grow with the training set: the medoid check by thumbnail candidates is exact (the
same index and distance as comparing with every image), and a training folder on disk is audited end to end
without ever reading more than a batch of it at once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from memaudit.attacks.extraction import ExtractionConfig, analyze_prompt, normalized_l2
from memaudit.audit import AuditConfig, run_audit
from memaudit.core.errors import ConfigError, DataError
from memaudit.data import ImageCaptionDataset, from_arrays, load_dataset
from memaudit.index import (
    ExhaustiveLookup,
    ThumbnailLookup,
    dataset_reader,
    descriptors,
    downsample,
    exact_distances,
    thumbnail_grid,
)
from memaudit.sampling import Sampler

# -- the lookup --------------------------------------------------------------------------------------------------


def _tensor_lookup(images: torch.Tensor) -> ThumbnailLookup:
    """A thumbnail lookup over a tensor, added in batches of 7, that counts what it reads."""
    lookup = ThumbnailLookup(lambda idx: images[idx], images.shape[1:])
    for start in range(0, len(images), 7):
        lookup.add(images[start:start + 7])
    return lookup


def _reference(query: torch.Tensor, images: torch.Tensor) -> tuple[int, float]:
    d = exact_distances(query, images)
    return int(np.argmin(d)), float(d.min())  # numpy's argmin: the lowest index among equal minima


def _agree(lookup: ThumbnailLookup, images: torch.Tensor, queries: torch.Tensor) -> int:
    """Every query's nearest image and distance from the candidates equal the exhaustive ones; returns reads."""
    exhaustive = ExhaustiveLookup(images)
    before = lookup.images_read
    for q in queries:
        i, d = lookup.nearest(q)
        ref_i, ref_d = _reference(q, images)
        assert (i, d) == (ref_i, ref_d)
        assert exhaustive.nearest(q) == (ref_i, ref_d)
        # and the torch computation of the same normalized L2 agrees to rounding
        assert abs(d - float(normalized_l2(q[None], images[ref_i:ref_i + 1])[0, 0])) < 1e-6
    return lookup.images_read - before


def _smooth(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Images with structure at every scale: low-resolution noise enlarged, plus fine noise of varying strength."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.nn.functional.interpolate(torch.rand(n, c, 5, 5, generator=g), size=(h, w), mode="bilinear")
    fine = torch.rand(n, 1, 1, 1, generator=g) * 0.3 * (torch.rand(n, c, h, w, generator=g) - 0.5)
    return (coarse + fine).clamp(0, 1)


@pytest.mark.parametrize("shape", [(3, 20, 20), (1, 32, 32), (3, 16, 16), (3, 64, 64)])
def test_candidates_agree_with_the_exhaustive_check(shape):
    images = _smooth(300, shape, seed=0)
    lookup = _tensor_lookup(images)
    assert len(lookup) == 300 and lookup.grid == thumbnail_grid(shape[1], shape[2])
    g = torch.Generator().manual_seed(1)
    # planted copies: a training image plus small noise; the nearest is that image, found after a few reads
    picks = torch.randint(0, 300, (40,), generator=g)
    copies = (images[picks] + 0.01 * torch.randn(40, *shape, generator=g)).clamp(0, 1)
    reads = _agree(lookup, images, copies)
    assert [lookup.nearest(q)[0] for q in copies] == picks.tolist()
    assert reads < 40 * 30  # about a handful per query, not 300
    # random queries whose nearest image is not obvious: blends of two or three training images, plus noise
    idx = torch.randint(0, 300, (60, 3), generator=g)
    w = torch.rand(60, 3, 1, 1, 1, generator=g)
    blends = (images[idx] * (w / w.sum(1, keepdim=True))).sum(1)
    blends = (blends + 0.05 * torch.randn(blends.shape, generator=g)).clamp(0, 1)
    _agree(lookup, images, blends)
    # noise, far from everything
    _agree(lookup, images, torch.rand(30, *shape, generator=g))


def test_noise_training_set_and_uninformative_descriptors_still_exact():
    g = torch.Generator().manual_seed(2)
    noise = torch.rand(120, 3, 32, 32, generator=g)
    _agree(_tensor_lookup(noise), noise, torch.rand(40, 3, 32, 32, generator=g))
    # every image has the same descriptor (grey plus +-0.3 in a pattern that averages to zero in every 2x2 block: the
    # same block means, the same residual norm): the bounds are useless and the search reads everything, but its
    # answer is still the exhaustive one
    signs = torch.where(torch.rand(120, 3, 16, 16, generator=g) < 0.5, -1.0, 1.0)
    block = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(16, 16)
    pattern = 0.5 + 0.3 * block * signs.repeat_interleave(2, 2).repeat_interleave(2, 3)
    lookup = _tensor_lookup(pattern)
    assert np.ptp(descriptors(pattern, lookup.grid), axis=0).max() == 0
    reads = _agree(lookup, pattern, torch.rand(5, 3, 32, 32, generator=g))
    assert reads == 5 * 120


def test_ties_go_to_the_lowest_index_like_argmin():
    images = _smooth(50, (3, 16, 16), seed=3)
    images[[9, 21, 40]] = images[33].clone()  # four equal images: 9 is the lowest index
    images[[12, 30]] = images[30].flip(-1).clone()  # two equal images
    lookup = _tensor_lookup(images)
    g = torch.Generator().manual_seed(4)
    for target in (33, 40, 9):
        q = (images[target] + 0.02 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
        assert lookup.nearest(q)[0] == 9 == _reference(q, images)[0]
    assert lookup.nearest(images[30])[0] == 12 and lookup.nearest(images[30])[1] == 0.0
    _agree(lookup, images, images)  # every training image finds itself, or an equal one of lower index
    # equal exact distances, but the higher index has the nearer descriptor (faiss returns it first). In 2x2 blocks,
    # the query is grey + q, image 7 grey + s (s orthogonal to q, both averaging to zero) and image 2 grey + b (b
    # constant in each block, |b| = |s|): both are sqrt(0.078125) from the query, exactly; the descriptor bound of 7 is
    # | |q| - |s| | = 0.125, that of 2 is exact
    grey = torch.full((3, 32, 32), 0.5)
    q = 0.125 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(16, 16).expand(3, 32, 32)
    s = 0.25 * torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).repeat(16, 16).expand(3, 32, 32)
    signs = torch.where(torch.rand(3, 16, 16, generator=g) < 0.5, -1.0, 1.0)
    b = 0.25 * signs.repeat_interleave(2, 1).repeat_interleave(2, 2)
    far = torch.rand(10, 3, 32, 32, generator=g) * 0.1
    images = torch.cat([far[:2], (grey + b)[None], far[2:6], (grey + s)[None], far[6:]])
    lookup = _tensor_lookup(images)
    query = grey + q
    returned, rows = lookup.index.search(descriptors(query[None], lookup.grid), 2)
    assert rows[0].tolist() == [7, 2] and returned[0, 0] < 0.5 * returned[0, 1]
    assert exact_distances(query, images[[2, 7]]).tolist() == [math.sqrt(0.078125)] * 2
    assert lookup.nearest(query) == (2, math.sqrt(0.078125)) == _reference(query, images)


def test_own_image_reads_one_image_and_errors():
    images = _smooth(30, (3, 16, 16), seed=5)
    lookup = _tensor_lookup(images)
    q = images[7] * 0.9
    assert lookup.distance(q, 4) == float(exact_distances(q, images[4:5])[0])
    assert lookup.images_read == 1
    assert lookup.distance(q[None], 4) == ExhaustiveLookup(images).distance(q, 4)
    with pytest.raises(ConfigError, match="out of range"):
        lookup.distance(q, 30)
    with pytest.raises(ConfigError, match="cannot be compared"):
        lookup.nearest(q[:1])
    with pytest.raises(ConfigError, match="NaN"):
        lookup.nearest(torch.full((3, 16, 16), float("nan")))
    with pytest.raises(ConfigError, match="empty"):
        ThumbnailLookup(lambda idx: images[idx], (3, 16, 16)).nearest(q)


def test_descriptor_distance_is_a_lower_bound():
    g = torch.Generator().manual_seed(6)
    a, b = _smooth(200, (3, 24, 24), seed=7), torch.rand(200, 3, 24, 24, generator=g)
    b[:100] = _smooth(100, (3, 24, 24), seed=8)
    grid = thumbnail_grid(24, 24)
    assert grid == (12, 12) and thumbnail_grid(20, 64) == (10, 16) and thumbnail_grid(17, 16) == (1, 16)
    da, db = descriptors(a, grid).astype(np.float64), descriptors(b, grid).astype(np.float64)
    assert da.shape == (200, 3 * 12 * 12 + 1)
    values = 3 * 12 * 12
    thumb = np.sqrt(((da[:, :-1] - db[:, :-1]) ** 2).sum(1) / values)  # block means only
    bound = np.sqrt(((da - db) ** 2).sum(1) / values)  # with the residual norms
    exact = np.array([exact_distances(a[i], b[i:i + 1])[0] for i in range(200)])
    assert np.all(thumb <= bound) and np.all(bound <= exact)
    assert (exact - bound).mean() < 0.5 * (exact - thumb).mean()  # the residual norm tightens the bound
    lookup = _tensor_lookup(b)
    for i in range(20):  # the margin for float32 rounding only lowers the bound, by little
        qd = descriptors(a[i:i + 1], grid)
        margin_bound = lookup.lower_bound(float(np.sqrt(((qd[0] - descriptors(b[i:i + 1], grid)[0]) ** 2).sum())),
                                          float((qd.astype(np.float64) ** 2).sum()))
        assert bound[i] - 0.02 < margin_bound <= exact[i]


def test_analyze_prompt_with_a_lookup_gives_the_tensors_verdict():
    images = _smooth(60, (3, 16, 16), seed=8)
    lookup = _tensor_lookup(images)
    g = torch.Generator().manual_seed(9)
    cfg = ExtractionConfig(min_clique=4)
    for target, own in ((5, None), (5, 5), (5, 6), (None, None)):
        base = images[target] if target is not None else torch.rand(3, 16, 16, generator=g)
        gens = (base + 0.003 * torch.randn(8, 3, 16, 16, generator=g)).clamp(0, 1)
        assert analyze_prompt(gens, cfg, lookup, own) == analyze_prompt(gens, cfg, images, own)
    with pytest.raises(ConfigError, match="training images are 3x16x16 but generations are 3x8x8"):
        analyze_prompt(torch.rand(4, 3, 8, 8), cfg, lookup)
    with pytest.raises(ConfigError, match="own_index 60 is out of range for 60"):
        analyze_prompt(gens, cfg, lookup, 60)


# -- a training folder on disk, audited end to end --------------------------------------------------------------

N_DISK = 40


@pytest.fixture(scope="module")
def disk_train(tmp_path_factory):
    """40 PNGs of 16 px with captions, and the same pixels as a tensor in [0, 1] (for the fake sampler)."""
    folder = tmp_path_factory.mktemp("disk-train")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (N_DISK, 16, 16, 3), dtype=np.uint8)
    lines = ["file,caption"]
    for i in range(N_DISK):
        Image.fromarray(pixels[i]).save(folder / f"img{i:02d}.png")
        lines.append(f"img{i:02d}.png,a photo of item {i}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def _sampler_copying(monkeypatch, images01: torch.Tensor, plant: dict[str, int]):
    """Prompts in ``plant`` generate their training image plus 1e-3 noise; others uniform noise."""

    def sample_batch(self, prompts, seeds):
        g = torch.Generator().manual_seed(int(seeds[0]) % 2**31)
        noise = torch.rand(len(prompts), 3, 16, 16, generator=g)
        out = torch.stack([images01[plant[p]] if p in plant else noise[k] for k, p in enumerate(prompts)])
        out = (out + 1e-3 * torch.randn(out.shape, generator=g)).clamp(0, 1)
        norms = torch.rand(len(prompts), self.steps, generator=g)
        return out, norms, torch.arange(self.steps), {d.name: norms[:, 0] for d in self.detectors}

    monkeypatch.setattr(Sampler, "sample_batch", sample_batch)


def _watch_reads(monkeypatch) -> dict:
    """Record every read() and every streamed batch of a dataset, and that none holds its images in memory."""
    seen = {"read": [], "batch": [], "batch_size": []}
    real_read, real_batches = ImageCaptionDataset.read, ImageCaptionDataset.batches

    def read(self, indices):
        assert self.images is None
        out = real_read(self, indices)
        seen["read"].append(len(out))
        return out

    def batches(self, batch_size=64, indices=None, **kw):
        assert self.images is None
        seen["batch_size"].append(batch_size)
        for index, images in real_batches(self, batch_size, indices, **kw):
            assert self.images is None
            seen["batch"].append(len(images))
            yield index, images

    monkeypatch.setattr(ImageCaptionDataset, "read", read)
    monkeypatch.setattr(ImageCaptionDataset, "batches", batches)
    return seen


def _disk_config(tmp_path, **kw):
    return AuditConfig(**{"generations": 6, "min_clique": 4, "steps": 2, "batch_size": 6, "device": "cpu",
                          "feature_options": {"batch_size": 8}, "cache_dir": str(tmp_path / "cache"), **kw})


def test_a_folder_on_disk_is_audited_a_batch_at_a_time(tmp_path, monkeypatch, tiny_dir_eps, disk_train):
    folder, images01 = disk_train
    plant = {"a photo of item 3": 3, "a photo of item 17": 17, "a red square": 29}  # the last has no own image
    prompts = ["a photo of item 3", "a photo of item 17", "a photo of item 8", "a red square", "a blue circle"]
    _sampler_copying(monkeypatch, images01, plant)
    seen = _watch_reads(monkeypatch)
    stages = []
    res = run_audit(str(tiny_dir_eps), str(folder), tmp_path / "out", prompts=prompts, config=_disk_config(tmp_path),
                    progress=lambda s, d, t: stages.append((s, d, t)))
    rows = {p["prompt"]: p for p in res["prompts"]}
    for prompt, own in plant.items():
        assert rows[prompt]["extracted"] and rows[prompt]["nearest_train_index"] == own
        assert rows[prompt]["nearest_train_distance"] < 0.01
        assert (tmp_path / "out" / "train" / f"train-{own:05d}.png").is_file()
    assert rows["a red square"]["own_train_index"] is None  # found by the candidate search over all 40
    assert not rows["a photo of item 8"]["flagged"] and not rows["a blue circle"]["flagged"]
    assert res["summary"]["n_train"] == N_DISK and res["summary"]["extracted_training_images"] == 3
    # one streamed pass in batches of the extractor's size; otherwise only a handful of images at a time
    assert seen["batch_size"] == [8] and sum(seen["batch"]) == N_DISK and max(seen["batch"]) == 8
    assert seen["read"] and max(seen["read"]) <= 8 and sum(seen["read"]) < N_DISK
    assert ("training features", 16, N_DISK) in stages and ("training features", N_DISK, N_DISK) in stages

    # the same images in memory give the same results, number for number
    ds = load_dataset(folder, 16, 3)
    monkeypatch.undo()
    _sampler_copying(monkeypatch, images01, plant)
    memory = from_arrays(ds.read(range(N_DISK)).add(1).div(2), ds.captions, ds.names)
    res_mem = run_audit(str(tiny_dir_eps), memory, tmp_path / "mem", prompts=prompts, config=_disk_config(tmp_path))
    for a, b in zip(res["prompts"], res_mem["prompts"]):
        assert a == b
    assert res["summary"]["amd"] == res_mem["summary"]["amd"]
    assert [r["min_cosine_distance"] for r in res["images"]] == [r["min_cosine_distance"] for r in res_mem["images"]]

    # a second audit of the folder finds both indexes in the cache: no pass over the set
    seen = _watch_reads(monkeypatch)
    again = run_audit(str(tiny_dir_eps), str(folder), tmp_path / "out", prompts=prompts,
                      config=_disk_config(tmp_path))
    assert seen["batch"] == [] and again["prompts"] == res["prompts"]


def test_a_file_that_breaks_during_the_stream_names_itself_and_leaves_nothing(tmp_path, monkeypatch, tiny_dir_eps,
                                                                               disk_train):
    folder, images01 = disk_train
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = ["file,caption"]
    for i in range(N_DISK):
        (broken / f"img{i:02d}.png").write_bytes((folder / f"img{i:02d}.png").read_bytes())
        lines.append(f"img{i:02d}.png,a photo of item {i}")
    (broken / "captions.csv").write_text("\n".join(lines) + "\n")
    data = (broken / "img25.png").read_bytes()
    (broken / "img25.png").write_bytes(data[: len(data) // 2])  # the header is intact; the pixels are cut
    _sampler_copying(monkeypatch, images01, {})
    with pytest.raises(DataError) as e:
        run_audit(str(tiny_dir_eps), str(broken), tmp_path / "out", prompts=["a photo of item 1"],
                  config=_disk_config(tmp_path))
    assert "img25.png" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert not list((tmp_path / "cache").rglob("*.faiss"))  # no half-built index was cached


def test_the_reader_gives_what_the_stream_gave(disk_train):
    folder, _ = disk_train
    ds = load_dataset(folder, 16, 3)
    read = dataset_reader(ds, 8)
    streamed = torch.cat([downsample((x + 1) / 2, 8) for _, x in ds.batches(7, workers=0)])
    assert torch.equal(read([5, 0, 39]), streamed[[5, 0, 39]])
    assert read([3]).shape == (1, 3, 8, 8) and math.isclose(float(read([3]).max()), float(streamed[3].max()))
