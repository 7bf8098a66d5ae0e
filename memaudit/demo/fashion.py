"""The ``fashion`` setting: a base that already draws the domain, fine-tuned on new products with graded duplication.

Source: Fashion-MNIST (Xiao et al., 2017; 70,000 28x28 grayscale product photos in 10 classes, MIT licence), as
Debian ships it (``apt-get install dataset-fashion-mnist``; the four idx files under
``/usr/share/datasets/fashion-mnist``). Chosen because the base can learn the whole domain from 60,000 images on a
CPU in well under an hour at 32x32, and because its products are distinct objects of a few kinds, as a catalogue
or a set of studies is: a fine-tune on new products is a fine-tune on new items of a domain the base already draws,
which is how real fine-tunes start.

- **Base** (``fashion/base/``): VAE, CLIP text encoder and UNet trained from scratch on the 60,000 training images,
  each captioned by its class and a product number whose three digits describe the image (ink, width and height,
  each as a decile within the class), "a photo of a sneaker, product four zero seven": the base learns the classes,
  and that number words matter, as the faces base learns digit words from MNIST.
- **Fine-tune set**: products of the *test* split (never seen by the base or its VAE), each with its own number;
  they come in duplication levels: :data:`COPIES` (1, 2, 4, 8, 16, 32 copies), :data:`PER_LEVEL` products each.
  The set the fine-tune trains on holds every product as many times as its level says, the way duplicates in LAION
  or repeated studies in MIMIC drive memorization.
- **Held out**: other products of the test split, with their own numbers: their captions are the reference prompts
  and their images measure quality.
- **Full fine-tune** (``fashion/full_ft/``): every UNet parameter tuned on the duplicated set; it memorizes the
  products it saw often and not the others.

The products' pixels ship in ``fashion/products.npz`` (uint8, no pickles), so the demo and tests need nothing but
the package; the source files are needed only by ``python -m memaudit.demo.build --setting fashion``.
"""

from __future__ import annotations

import gzip
import io
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from memaudit.core.errors import DataError
from memaudit.core.io import atomic_write_bytes
from memaudit.data import from_arrays

FASHION_DIR = Path(__file__).resolve().parent / "fashion"
PRODUCTS_FILE = FASHION_DIR / "products.npz"
SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_WORDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: copies of each product in the fine-tune set, by duplication level
COPIES = (1, 2, 4, 8, 16, 32)
#: products per duplication level
PER_LEVEL = 30
#: held-out products (reference prompts and quality)
N_HELDOUT = 200
SPLITS = ("train", "heldout", "all")


def caption(label: int, number: int) -> str:
    """"a photo of a sneaker, product four zero seven": the class and a three-digit product number in words."""
    return f"a photo of a {CLASS_WORDS[int(label)]}, product {' '.join(DIGIT_WORDS[int(c)] for c in f'{number:03d}')}"


def class_caption(label: int) -> str:
    """"a photo of a sneaker": the class alone."""
    return f"a photo of a {CLASS_WORDS[int(label)]}"


def vocabulary() -> list[str]:
    """Every word a caption of this setting uses (the tokenizer is CLIP's restricted to them)."""
    return [caption(label, 0) for label in range(len(CLASS_WORDS))] + list(DIGIT_WORDS)


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array: the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); install Debian's dataset-fashion-mnist or pass "
                        "--source DIR with the four idx files.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {data.size} bytes of data for shape {shape}.")
    return data.reshape(shape)


def source_split(split: str, source: str | Path = SOURCE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's ``train`` or ``t10k`` images (uint8 ``[N, 28, 28]``) and labels from ``source``."""
    source = Path(source)
    images = read_idx(source / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{split}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} {split} images but {len(labels)} labels.")
    return images, labels.astype(np.int64)


def to_model(images: np.ndarray, resolution: int = 32) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float ``[N, 1, R, R]`` in [0, 1], zero-padded to ``resolution`` (as MNIST is)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0)[:, None]
    pad = (resolution - x.shape[-1]) // 2
    if pad > 0:
        x = torch.nn.functional.pad(x, (pad, resolution - x.shape[-1] - pad, pad, resolution - x.shape[-2] - pad))
    return x.contiguous()


def choose_products(labels: np.ndarray, seed: int) -> dict:
    """The recipe: which test-split items become fine-tune products (and their copies) and which are held out,
    class-balanced, each with its own product number. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    classes = len(CLASS_WORDS)
    if PER_LEVEL % classes or N_HELDOUT % classes:
        raise ValueError("products per level and held-out products must be multiples of the number of classes")
    by_class = [iter(rng.permutation(np.flatnonzero(labels == c))) for c in range(classes)]
    groups = [PER_LEVEL // classes] * len(COPIES) + [N_HELDOUT // classes]  # each level, then the held-out set
    picked = np.array([next(by_class[c]) for k in groups for c in range(classes) for _ in range(k)])
    n_train = PER_LEVEL * len(COPIES)
    n = len(picked)
    numbers = rng.choice(1000, size=n, replace=False)
    copies = np.zeros(n, dtype=np.int64)
    copies[:n_train] = np.repeat(COPIES, PER_LEVEL)
    split = np.array(["train"] * n_train + ["heldout"] * N_HELDOUT)
    return {"index": picked, "label": labels[picked], "number": numbers, "copies": copies, "split": split}


def demo_prompts(captions: list[str]) -> list[str]:
    """The demo's prompts, from the training captions in recipe order: at each duplication level one product of every
    other class, the classes alternating between levels (30 of 180: 5 per level, every class at 3 levels)."""
    per_class, classes = PER_LEVEL // len(CLASS_WORDS), len(CLASS_WORDS)
    return [c for i, c in enumerate(captions)
            if i % per_class == 0 and (i // PER_LEVEL + (i // per_class) % classes) % 2 == 0]


def write_products(path: str | Path, images: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Choose the products from the test split (``images``, ``labels``) and write their pixels and recipe."""
    recipe = choose_products(labels, seed)
    captions = np.array([caption(lb, nb) for lb, nb in zip(recipe["label"], recipe["number"])])
    buf = io.BytesIO()
    np.savez_compressed(buf, images=images[recipe["index"]], caption=captions, **recipe)
    atomic_write_bytes(Path(path), buf.getvalue())
    return recipe


def read_products(path: str | Path = PRODUCTS_FILE) -> dict:
    """The bundled products: ``images`` (uint8 ``[N, 28, 28]``), ``caption``, ``label``, ``number``, ``copies``
    (0 for held-out products), ``split`` and ``index`` (the item of Fashion-MNIST's test split)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the fashion products {path} ({e}); reinstall memaudit or rebuild with "
                        "python -m memaudit.demo.build --setting fashion.") from None


def products_dataset(split: str = "train", duplicated: bool = False, path: str | Path = PRODUCTS_FILE,
                     every: int = 1):
    """The products of ``split`` (``train``, ``heldout`` or ``all``) as an image-caption dataset; with
    ``duplicated``, each training product as many times as its level says (the set the full fine-tune saw); with
    ``every=k``, every k-th product only (products come level by level, class by class)."""
    if split not in SPLITS:
        raise DataError(f"fashion split {split!r} does not exist; use train, heldout or all.")
    p = read_products(path)
    keep = np.flatnonzero((p["split"] == split) | (split == "all"))[::every]
    if duplicated:
        keep = np.repeat(keep, np.maximum(p["copies"][keep], 1))
    names, seen = [], Counter()
    for i in p["index"][keep]:
        seen[i] += 1
        names.append(f"fashion-t10k-{int(i):05d}" + (f"-copy{seen[i]}" if duplicated else ""))
    return from_arrays(to_model(p["images"][keep]), [str(c) for c in p["caption"][keep]], names=names,
                       source=f"Fashion-MNIST test split via {Path(path).name} ({split}"
                              f"{', duplicated' if duplicated else ''}{f', every {every}' if every > 1 else ''})")
