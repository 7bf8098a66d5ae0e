"""Tests for memaudit.data: loading image-caption datasets from disk and arrays, subsets and splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from memaudit.core.errors import DataError
from memaudit.data import ImageCaptionDataset, from_arrays, load_dataset

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


def _save(path: Path, color: tuple[int, int, int] | int = (128, 64, 32), size=(30, 20), mode: str = "RGB") -> Path:
    """Write a solid-colour image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _write_csv(path: Path, rows: list[tuple[str, str]], header: str = "file,caption") -> Path:
    lines = [header] + [f"{f},{c}" for f, c in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"file": f, "caption": c}) + "\n" for f, c in rows), encoding="utf-8")
    return path


def _raises(match: str, fn, *args, **kwargs) -> DataError:
    """Call fn, expect a one-line DataError whose message contains ``match``."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert match in msg, msg
    return info.value


@pytest.fixture
def three(tmp_path: Path) -> Path:
    """A folder with three 30x20 RGB images of different colours."""
    _save(tmp_path / "a.png", RED)
    _save(tmp_path / "b.png", GREEN)
    _save(tmp_path / "sub" / "c.jpg", BLUE)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------------


def test_csv_source(three: Path) -> None:
    csv_path = three / "captions.csv"
    csv_path.write_text(
        'file,caption,extra\nb.png,  "a green, square"  ,x\na.png,red thing,y\nsub/c.jpg,blue,z\n', encoding="utf-8"
    )
    for path in (csv_path, three):  # the file itself, or its folder
        ds = load_dataset(path, resolution=8, channels=3)
        assert ds.captions == ["a green, square", "red thing", "blue"]
        assert ds.names == ["b.png", "a.png", "sub/c.jpg"]
        assert ds.read(range(len(ds))).shape == (3, 3, 8, 8) and ds.read(range(len(ds))).dtype == torch.float32
        assert ds.channels == 3 and ds.resolution == 8 and len(ds) == 3
        assert ds.read(range(len(ds))).min() >= -1 and ds.read(range(len(ds))).max() <= 1
        assert ds.source == str(csv_path)
        # b.png is green: G channel high, R low
        assert ds.read(range(len(ds)))[0, 1].mean() > 0.9 and ds.read(range(len(ds)))[0, 0].mean() < -0.9


def test_jsonl_source_grayscale(three: Path) -> None:
    p = three / "captions.jsonl"
    p.write_text(
        json.dumps({"file": "a.png", "caption": " red ", "score": 1})
        + "\n\n"
        + json.dumps({"file": "sub/c.jpg", "caption": "blue"})
        + "\n",
        encoding="utf-8",
    )
    ds = load_dataset(three, resolution=5, channels=1)
    assert ds.captions == ["red", "blue"]
    assert ds.names == ["a.png", "sub/c.jpg"]
    assert ds.read(range(len(ds))).shape == (2, 1, 5, 5)
    assert ds.read(range(len(ds))).min() >= -1 and ds.read(range(len(ds))).max() <= 1
    assert ds.to_pil(0).mode == "L" and ds.to_pil(0).size == (5, 5)


def test_folder_with_txt_source(tmp_path: Path) -> None:
    _save(tmp_path / "b.PNG", 255, mode="L")
    (tmp_path / "b.txt").write_text("white\n", encoding="utf-8")
    _save(tmp_path / "a.jpg", RED)
    (tmp_path / "a.txt").write_text("  red  ", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    ds = load_dataset(str(tmp_path), resolution=4, channels=3)
    assert ds.names == ["a.jpg", "b.PNG"]
    assert ds.captions == ["red", "white"]
    assert ds.read(range(len(ds))).shape == (2, 3, 4, 4)
    assert ds.to_pil(1).mode == "RGB"


def test_captions_file_argument(three: Path) -> None:
    _write_csv(three / "captions.csv", [("a.png", "from csv")])
    _write_jsonl(three / "captions.jsonl", [("b.png", "from jsonl")])
    _raises("captions_file", load_dataset, three, 4, 3)
    assert load_dataset(three, 4, 3, captions_file="captions.jsonl").captions == ["from jsonl"]
    other = _write_csv(three / "sub" / "other.csv", [("c.jpg", "abs")])
    assert load_dataset(three, 4, 3, captions_file=str(other)).names == ["c.jpg"]
    _raises("nope.csv", load_dataset, three, 4, 3, captions_file="nope.csv")


def test_white_black_exact_and_roundtrip(tmp_path: Path) -> None:
    _save(tmp_path / "w.png", (255, 255, 255), size=(13, 7))
    _save(tmp_path / "k.png", (0, 0, 0), size=(7, 13))
    _write_csv(tmp_path / "captions.csv", [("w.png", "white"), ("k.png", "black")])
    for ch in (1, 3):
        ds = load_dataset(tmp_path, resolution=6, channels=ch)
        assert torch.all(ds.read(range(len(ds)))[0] == 1.0)
        assert torch.all(ds.read(range(len(ds)))[1] == -1.0)
    assert np.all(np.asarray(ds.to_pil(0)) == 255) and np.all(np.asarray(ds.to_pil(1)) == 0)


def test_center_crop_keeps_middle(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 20), RED)  # wide image: red | green | blue thirds
    img.paste(GREEN, (20, 0, 40, 20))
    img.paste(BLUE, (40, 0, 60, 20))
    img.save(tmp_path / "wide.png")
    tall = img.transpose(Image.Transpose.ROTATE_90)  # tall image: thirds stacked vertically
    tall.save(tmp_path / "tall.png")
    _write_csv(tmp_path / "captions.csv", [("wide.png", "w"), ("tall.png", "t")])
    ds = load_dataset(tmp_path, resolution=10, channels=3)
    for i in range(2):
        pix = np.asarray(ds.to_pil(i)).astype(int)
        assert pix.shape == (10, 10, 3)
        assert tuple(pix[5, 5]) == GREEN
        # crop is the middle third: green dominates everywhere, no full red/blue edges
        assert np.all(pix[..., 1] > 150) and np.all(pix[..., 0] < 100) and np.all(pix[..., 2] < 100)


def test_truncated_loading_flag_restored(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    _write_csv(tmp_path / "captions.csv", [("a.png", "x")])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        load_dataset(tmp_path, 4, 3)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_error_path_missing(tmp_path: Path) -> None:
    _raises("does_not_exist", load_dataset, tmp_path / "does_not_exist", 4, 3)


def test_error_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "readme.txt").write_text("x")
    _raises("empty_dir", load_dataset, tmp_path / "empty_dir", 4, 3)


def test_error_bad_arguments(three: Path) -> None:
    _write_csv(three / "captions.csv", [("a.png", "x")])
    _raises("resolution", load_dataset, three, 0, 3)
    _raises("channels", load_dataset, three, 4, 2)
    _raises("a.png", load_dataset, three / "a.png", 4, 3)  # a file that is not a captions file


@pytest.mark.parametrize("content", ["", "file,caption\n", "\n\n"])
def test_error_empty_csv(tmp_path: Path, content: str) -> None:
    (tmp_path / "caps.csv").write_text(content, encoding="utf-8")
    _raises("caps.csv", load_dataset, tmp_path / "caps.csv", 4, 3)


def test_error_empty_jsonl(tmp_path: Path) -> None:
    (tmp_path / "caps.jsonl").write_text("\n  \n", encoding="utf-8")
    _raises("caps.jsonl", load_dataset, tmp_path / "caps.jsonl", 4, 3)


def test_error_missing_columns(three: Path) -> None:
    p = _write_csv(three / "captions.csv", [("a.png", "x")], header="path,text")
    e = _raises("captions.csv", load_dataset, p, 4, 3)
    assert "file" in str(e) and "caption" in str(e) and "'path'" in str(e) and "'text'" in str(e)
    p2 = _write_jsonl(three / "caps.jsonl", [("a.png", "x")])
    p2.write_text(json.dumps({"file": "a.png", "text": "x"}) + "\n", encoding="utf-8")
    e = _raises("caps.jsonl", load_dataset, p2, 4, 3)
    assert "caption" in str(e) and "line 1" in str(e)


def test_error_empty_caption(three: Path) -> None:
    p = _write_csv(three / "captions.csv", [("a.png", "x"), ("b.png", "   ")])
    e = _raises("captions.csv", load_dataset, p, 4, 3)
    assert "line 3" in str(e) and "b.png" in str(e)
    p2 = _write_jsonl(three / "caps.jsonl", [("a.png", "x"), ("b.png", "")])
    e = _raises("caps.jsonl", load_dataset, p2, 4, 3)
    assert "line 2" in str(e)
    (three / "a.txt").write_text("a", encoding="utf-8")
    (three / "b.txt").write_text(" \n", encoding="utf-8")
    (three / "captions.csv").unlink()
    _raises("b.txt", load_dataset, three, 4, 3)


def test_error_duplicate_files(three: Path) -> None:
    p = _write_csv(three / "captions.csv", [("a.png", "x"), ("b.png", "y"), ("a.png", "z")])
    e = _raises("captions.csv", load_dataset, p, 4, 3)
    assert "a.png" in str(e)
    p2 = _write_jsonl(three / "caps.jsonl", [("b.png", "x"), ("./b.png", "y")])
    _raises("b.png", load_dataset, p2, 4, 3)


def test_error_missing_images(three: Path) -> None:
    rows = [("a.png", "x")] + [(f"gone{i}.png", "y") for i in range(7)]
    p = _write_csv(three / "captions.csv", rows)
    e = _raises("gone0.png", load_dataset, p, 4, 3)
    msg = str(e)
    assert "captions.csv" in msg and "7" in msg and "gone4.png" in msg and "gone5.png" not in msg
    assert "2 more" in msg


def test_error_images_without_txt(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("ok", encoding="utf-8")
    _save(tmp_path / "lonely.png")
    _raises("lonely.png", load_dataset, tmp_path, 4, 3)


def test_error_invalid_json_line(three: Path) -> None:
    p = three / "caps.jsonl"
    p.write_text(json.dumps({"file": "a.png", "caption": "x"}) + "\n{not json\n", encoding="utf-8")
    e = _raises("caps.jsonl", load_dataset, p, 4, 3)
    assert "line 2" in str(e)


def test_error_unreadable_and_truncated_image(tmp_path: Path) -> None:
    full = _save(tmp_path / "good.png", size=(64, 64))
    data = full.read_bytes()
    # a noisy image so the PNG has a sizeable compressed payload to cut
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    cut = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(cut[: len(cut) // 2])
    (tmp_path / "junk.png").write_bytes(b"this is not an image" + data[:10])
    p = _write_csv(tmp_path / "captions.csv", [("good.png", "g"), ("cut.png", "c")])
    ds = load_dataset(p, 8, 3)  # the header is intact: the cut shows only when the pixels are decoded
    _raises("cut.png", ds.read, [1])
    for workers in (0, 1):  # in a loader worker too, the message is one line naming the file
        with pytest.raises(DataError) as e:
            list(ds.batches(1, workers=workers))
        assert "cut.png" in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value)
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a global opt-in elsewhere must not let truncated files through
    try:
        _raises("cut.png", ds.read, [1])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    p = _write_csv(tmp_path / "captions.csv", [("good.png", "g"), ("junk.png", "j")])
    _raises("junk.png", load_dataset, p, 8, 3)


# ---------------------------------------------------------------------------------------------------------------
# in-memory datasets
# ---------------------------------------------------------------------------------------------------------------


def _toy(n: int = 20) -> ImageCaptionDataset:
    imgs = np.arange(n, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)  # [N, 4, 4], image i == i
    return from_arrays(imgs, [f"cap {i}" for i in range(n)])


def test_from_arrays_uint8_grayscale() -> None:
    imgs = np.zeros((2, 5, 5), dtype=np.uint8)
    imgs[1] = 255
    ds = from_arrays(imgs, ["black", "white"])
    assert ds.images.shape == (2, 1, 5, 5) and ds.images.dtype == torch.float32
    assert torch.all(ds.images[0] == -1.0) and torch.all(ds.images[1] == 1.0)
    assert ds.names == ["0", "1"] and ds.source == "arrays"
    img, cap = ds[1]
    assert cap == "white" and img.shape == (1, 5, 5)


def test_from_arrays_float_channels_last_and_first() -> None:
    imgs = np.zeros((3, 6, 6, 3), dtype=np.float64)
    imgs[:, :, :, 0] = 1.0
    imgs[:, :, :, 2] = 0.5
    ds = from_arrays(imgs, ["a", "b", "c"], names=["x", "y", "z"])
    assert ds.images.shape == (3, 3, 6, 6) and ds.images.dtype == torch.float32
    assert torch.all(ds.images[:, 0] == 1.0) and torch.all(ds.images[:, 1] == -1.0)
    assert torch.allclose(ds.images[:, 2], torch.zeros(3, 6, 6))
    ds2 = from_arrays(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), ["a", "b", "c"])
    assert torch.allclose(ds.images, ds2.images)
    assert ds.to_pil(0).mode == "RGB"


def test_from_arrays_errors() -> None:
    _raises("captions", from_arrays, np.zeros((2, 4, 4), np.uint8), ["only one"])
    _raises("unique", from_arrays, np.zeros((2, 4, 4), np.uint8), ["a", "b"], names=["n", "n"])
    _raises("[0, 1]", from_arrays, np.full((1, 4, 4), 2.0), ["a"])
    _raises("shape", from_arrays, np.zeros((1, 4, 4, 5)), ["a"])


def test_subset_keeps_order() -> None:
    ds = _toy(10)
    sub = ds.subset([7, 2, 9])
    assert sub.captions == ["cap 7", "cap 2", "cap 9"] and sub.names == ["7", "2", "9"]
    assert torch.equal(sub.images, ds.images[[7, 2, 9]])
    assert len(ds.subset([])) == 0
    _raises("out of range", ds.subset, [10])


def test_split_deterministic_disjoint_covering() -> None:
    ds = _toy(20)
    a = ds.split(seed=3, val=0.1, test=0.2)
    b = ds.split(seed=3, val=0.1, test=0.2)
    assert set(a) == {"train", "val", "test"}
    assert {k: v.names for k, v in a.items()} == {k: v.names for k, v in b.items()}
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (14, 2, 4)
    names = [set(a[k].names) for k in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set().union(*names) == set(ds.names)
    for part in a.values():  # captions and images travel with their names
        for img, cap, name in zip(part.images, part.captions, part.names):
            assert cap == f"cap {name}" and torch.all(img == int(name) / 127.5 - 1.0)
    others = [ds.split(seed=s, val=0.1, test=0.2)["test"].names for s in range(4, 8)]
    assert any(o != a["test"].names for o in others)


@pytest.mark.parametrize("val,test", [(-0.1, 0.1), (0.1, -0.1), (0.5, 0.5), (0.9, 0.2)])
def test_split_bad_fractions(val: float, test: float) -> None:
    _raises("val", _toy(5).split, 0, val, test)


# ---------------------------------------------------------------------------------------------------------------
# datasets on disk are indexes
# ---------------------------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6 + i % 3, 9, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append((f"{i}.png", f"caption {i}"))
    return _write_csv(tmp_path / "captions.csv", rows)


def test_a_dataset_on_disk_holds_no_pixels_and_streams_in_order(tmp_path: Path) -> None:
    ds = load_dataset(_folder(tmp_path, 11), 4, 3)
    assert ds.images is None and ds.on_disk and len(ds) == 11
    assert not any(isinstance(v, torch.Tensor) for v in vars(ds).values())  # nothing of the whole set in memory
    whole = ds.read(range(11))
    for workers in (0, 2):
        seen, done = [], []
        for index, images in ds.batches(3, workers=workers, progress=lambda d, t, done=done: done.append((d, t))):
            assert images.shape[0] == len(index) <= 3
            assert torch.equal(images, whole[index])
            seen += index.tolist()
        assert seen == list(range(11)) and done[-1] == (11, 11) and len(done) == 4
    sub = ds.subset([7, 2])
    assert sub.on_disk and torch.equal(sub.read([0, 1]), whole[[7, 2]]) and sub.names == ["7.png", "2.png"]
    parts = ds.split(seed=0, val=0.2, test=0.0)
    assert sorted(parts["train"].names + parts["val"].names) == sorted(ds.names)


def test_image_keys_change_with_the_file_and_the_resolution(tmp_path: Path) -> None:
    p = _folder(tmp_path, 3)
    keys = load_dataset(p, 4, 3).image_keys()
    assert len(set(keys)) == 3 and load_dataset(p, 4, 3).image_keys() == keys
    assert load_dataset(p, 5, 3).image_keys() != keys
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "1.png")
    changed = load_dataset(p, 4, 3).image_keys()
    assert changed[0] == keys[0] and changed[2] == keys[2] and changed[1] != keys[1]
    mem = _toy(4)
    assert mem.image_keys() == _toy(4).image_keys() and mem.content_key() != mem.subset([1, 0, 2, 3]).content_key()


def test_image_keys_are_the_content_whatever_the_modification_time_or_the_place(tmp_path: Path) -> None:
    import hashlib
    import os
    import shutil

    from memaudit.data import DECODE_VERSION

    (tmp_path / "a").mkdir()
    p = _folder(tmp_path / "a", 3)
    ds = load_dataset(p, 4, 3)
    keys = ds.image_keys()
    digest = hashlib.sha256((tmp_path / "a" / "1.png").read_bytes()).hexdigest()
    assert ds.file_digests()[1] == digest
    assert keys[1] == hashlib.sha256(f"{digest}|3x4|decode={DECODE_VERSION}".encode()).hexdigest()[:32]
    # edited in place, same size, modification time put back: another image
    target = tmp_path / "a" / "1.png"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes (only the keys are asked for: nothing is decoded)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_mtime_ns == st.st_mtime_ns and target.stat().st_size == st.st_size
    edited = load_dataset(p, 4, 3).image_keys()
    assert edited[1] != keys[1] and edited[0] == keys[0] and edited[2] == keys[2]
    # a copy elsewhere (new times, new paths) keeps its keys; so does a subset, which needs no new digest
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = load_dataset(tmp_path / "b", 4, 3)
    assert copy.image_keys() == edited
    assert copy.subset([2, 0]).image_keys() == [edited[2], edited[0]]
    assert copy.content_key(captions=True) == load_dataset(p, 4, 3).content_key(captions=True)


def test_overlap_finds_the_same_images_under_other_names(tmp_path: Path) -> None:
    import shutil

    (tmp_path / "train").mkdir()
    train = load_dataset(_folder(tmp_path / "train", 4), 4, 3)
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy(tmp_path / "train" / "2.png", held / "x.png")  # the same image, another name
    Image.fromarray(np.full((6, 9, 3), 7, dtype=np.uint8)).save(held / "y.png")
    shutil.copy(tmp_path / "train" / "0.png", held / "z.png")
    for name in ("x", "y", "z"):
        (held / f"{name}.txt").write_text("a caption")
    other = load_dataset(held, 4, 3)
    assert train.overlap(other) == [0, 2] and other.overlap(train) == [0, 2]
    assert train.overlap(train) == [0, 1, 2, 3] and train.overlap(train.subset([3])) == [0]
    mem = _toy(4)
    assert mem.overlap(_toy(6)) == [0, 1, 2, 3]
    assert mem.overlap(from_arrays(np.full((1, 4, 4), 9, np.uint8), ["c"])) == []


def test_digests_travel_with_a_copy_of_the_dataset(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    ds = load_dataset(_folder(tmp_path / "d", 3), 4, 3)
    again = ImageCaptionDataset(ds.captions, ds.names, ds.source, files=ds.files, resolution=4, channels=3,
                                digests=ds.file_digests())
    assert again.image_keys() == ds.image_keys()
    with pytest.raises(DataError, match="SHA-256"):
        ImageCaptionDataset(ds.captions, ds.names, files=ds.files, resolution=4, channels=3, digests=["x"] * 3)
    (tmp_path / "d" / "1.png").unlink()
    with pytest.raises(DataError, match="1.png"):
        ImageCaptionDataset(ds.captions, ds.names, files=ds.files, resolution=4, channels=3).image_keys()


def test_a_split_by_content_keeps_copies_together_and_equals_the_plain_split_without_copies():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    unique = from_arrays(distinct, [f"item {i}" for i in range(10)], source="unique")
    for seed in range(4):
        plain, grouped = unique.split(seed, 0.2, 0.2), unique.split(seed, 0.2, 0.2, by_content=True)
        assert all(plain[k].names == grouped[k].names for k in plain)
    copies = [0, 0, 0, 1, 2, 2, 3, 4, 5, 5, 5, 5, 6, 7, 8, 9]
    dup = from_arrays(distinct[copies], [f"copy {i}" for i in range(len(copies))], source="copies")
    image_of = dict(zip(dup.names, copies))
    parts = dup.split(1, 0.2, 0.2, by_content=True)
    images = {k: {image_of[n] for n in part.names} for k, part in parts.items()}
    assert [len(images[k]) for k in ("train", "val", "test")] == [6, 2, 2]  # of the 10 distinct images
    assert not images["val"] & images["train"] and not images["test"] & images["train"]
    assert sum(len(p) for p in parts.values()) == 16  # every copy in its image's part


def test_distinct_keeps_the_first_copy_of_each_image_in_order():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 256, size=(4, 1, 8, 8), dtype=np.uint8)
    copies = [2, 0, 2, 2, 1, 0, 3]
    dup = from_arrays(distinct[copies], [f"copy {i}" for i in range(len(copies))], source="copies")
    once, index = dup.distinct()
    assert index.tolist() == [0, 1, 4, 6] and once.captions == ["copy 0", "copy 1", "copy 4", "copy 6"]
    assert torch.equal(once.images, dup.images[[0, 1, 4, 6]])
    unique = from_arrays(distinct, ["a", "b", "c", "d"], source="unique")
    assert unique.distinct()[0] is unique and unique.distinct()[1].tolist() == [0, 1, 2, 3]
