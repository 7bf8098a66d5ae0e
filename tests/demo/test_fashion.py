"""The fashion setting's data: the idx reader, the product recipe, captions and the classifier's caption classes."""

from __future__ import annotations

import numpy as np
import pytest

from memaudit.core.errors import DataError
from memaudit.demo import fashion
from memaudit.demo.fashion_scorer import caption_class


def test_idx_reader_reads_what_was_written_and_refuses_damage(tmp_path, write_idx):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", images)
    write_idx(tmp_path / "b", images, gz=False)
    assert np.array_equal(fashion.read_idx(tmp_path / "a.gz"), images)
    assert np.array_equal(fashion.read_idx(tmp_path / "b"), images)
    (tmp_path / "c").write_bytes((tmp_path / "b").read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        fashion.read_idx(tmp_path / "c")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        fashion.read_idx(tmp_path / "missing.gz")


def test_caption_names_class_and_number_and_the_scorer_reads_the_class():
    assert fashion.caption(7, 407) == "a photo of a sneaker, product four zero seven"
    assert fashion.caption(9, 5) == "a photo of a ankle boot, product zero zero five"
    for label in range(10):
        assert caption_class(fashion.caption(label, 123)) == label
    assert caption_class("a handwritten digit seven") is None


def test_products_are_balanced_disjoint_and_deterministic():
    labels = np.repeat(np.arange(10), 1000)  # the test split's 1,000 per class
    a, b = fashion.choose_products(labels, 0), fashion.choose_products(labels, 0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["index"], fashion.choose_products(labels, 1)["index"])
    n_train = fashion.PER_LEVEL * len(fashion.COPIES)
    assert len(set(a["index"].tolist())) == len(a["index"]) == n_train + fashion.N_HELDOUT  # each item once
    assert len(set(a["number"].tolist())) == len(a["number"])  # each product its own number, so its own caption
    assert np.array_equal(labels[a["index"]], a["label"])
    for copies in fashion.COPIES:  # every level has every class equally often
        level = a["label"][a["copies"] == copies]
        assert np.array_equal(np.bincount(level, minlength=10), np.full(10, fashion.PER_LEVEL // 10))
    assert (a["copies"][a["split"] == "heldout"] == 0).all()


def test_duplicated_set_repeats_each_product_by_its_level(tmp_path):
    labels = np.repeat(np.arange(10), 1000)
    images = np.random.default_rng(0).integers(0, 256, size=(10000, 28, 28), dtype=np.uint8)
    path = tmp_path / "products.npz"
    fashion.write_products(path, images, labels, seed=0)
    train = fashion.products_dataset("train", path=path)
    dup = fashion.products_dataset("train", duplicated=True, path=path)
    held = fashion.products_dataset("heldout", path=path)
    assert len(train) == fashion.PER_LEVEL * len(fashion.COPIES) and len(held) == fashion.N_HELDOUT
    assert len(dup) == fashion.PER_LEVEL * sum(fashion.COPIES)
    counts = {c: dup.captions.count(c) for c in set(dup.captions)}
    assert sorted(set(counts.values())) == list(fashion.COPIES)
    assert len(set(train.captions)) == len(train) and not set(train.captions) & set(held.captions)
    with pytest.raises(DataError, match="split"):
        fashion.products_dataset("test", path=path)


def test_demo_audits_every_level_and_class_equally(tmp_path):
    labels = np.repeat(np.arange(10), 1000)
    images = np.zeros((10000, 28, 28), dtype=np.uint8)
    path = tmp_path / "products.npz"
    recipe = fashion.write_products(path, images, labels, seed=0)
    train = fashion.products_dataset("train", path=path)
    chosen = fashion.demo_prompts(train.captions)
    row = {c: i for i, c in enumerate(train.captions)}
    assert len(chosen) == 30 and len(set(chosen)) == 30
    levels = [int(recipe["copies"][row[c]]) for c in chosen]
    classes = [int(recipe["label"][row[c]]) for c in chosen]
    assert all(levels.count(k) == 5 for k in fashion.COPIES)  # 5 products at every duplication level
    assert np.array_equal(np.bincount(classes, minlength=10), np.full(10, 3))  # every class 3 times
    assert len({(lv, c) for lv, c in zip(levels, classes)}) == 30
    held = fashion.products_dataset("heldout", path=path, every=10)
    assert len(held) == 20 and "every 10" in held.source


def test_base_captions_by_class_random_number_or_attributes_and_set():
    from memaudit.demo.build import main, overridden
    from memaudit.demo.build_fashion import FashionSettings, base_captions

    labels = np.array([7, 7, 0])
    with_numbers = base_captions(labels, seed=0, numbers="random")
    assert all(c.startswith("a photo of a sneaker, product ") for c in with_numbers[:2])
    assert with_numbers == base_captions(labels, 0, "random") != base_captions(labels, 1, "random")
    assert base_captions(labels, seed=0) == ["a photo of a sneaker"] * 2 + ["a photo of a t-shirt"]
    assert [caption_class(c) for c in base_captions(labels, 0)] == [7, 7, 0]
    assert FashionSettings().base_numbers == "attributes"  # the recipe of the bundled build
    assert overridden(FashionSettings(), ["base_numbers=class", "ft_steps=10"]).base_numbers == "class"
    with pytest.raises(SystemExit, match="no setting"):
        overridden(FashionSettings(), ["nope=1"])
    with pytest.raises(SystemExit, match="base_numbers=maybe: use one of class, random, attributes"):
        main(["--setting", "fashion", "--set", "base_numbers=maybe"])
    with pytest.raises(ValueError, match="use one of"):
        base_captions(labels, 0, "maybe")


def test_attribute_numbers_are_per_class_deciles_of_ink_width_and_height():
    """Hand-made images: ink rises with the index; a bar whose width rises and one whose height rises."""
    from memaudit.demo.build_fashion import attribute_numbers, base_captions

    n = 10
    ink = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        ink[i, 10:18, 10:18] = 20 + 20 * i  # same shape, brighter and brighter
    wide = np.zeros((n, 28, 28), np.uint8)
    tall = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        wide[i, 13:15, 13 - i:15 + i] = 200  # wider and wider
        tall[i, 13 - i:15 + i, 13:15] = 200  # taller and taller
    labels = np.zeros(n, np.int64)
    assert (attribute_numbers(ink, labels) // 100).tolist() == list(range(n))
    assert (attribute_numbers(wide, labels) // 10 % 10).tolist() == list(range(n))
    assert (attribute_numbers(tall, labels) % 10).tolist() == list(range(n))
    # deciles are taken within each class: two classes of 10 each get every digit once
    both = attribute_numbers(np.concatenate([ink, ink[::-1]]), np.repeat([0, 1], n)) // 100
    assert both.tolist() == list(range(n)) + list(range(n))[::-1]
    captions = base_captions(np.full(n, 7), 0, "attributes", ink)
    assert captions[9].startswith("a photo of a sneaker, product nine ") and "product zero" in captions[0]
