"""Shared fixtures: tiny Stable Diffusion pipelines saved once per session, and a tiny image-caption dataset.

Everything runs offline (``HF_HUB_OFFLINE=1``) and on the CPU. The tiny models are so small that one torch thread
is faster than several (and does not fight other processes for the cores), so tests use one thread unless
``MEMAUDIT_TEST_THREADS`` says otherwise.
"""

from __future__ import annotations

import gzip
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("MEMAUDIT_TEST_THREADS", "1")))
os.environ.setdefault("MEMAUDIT_THREADS", os.environ.get("MEMAUDIT_TEST_THREADS", "1"))  # what CLI commands use



@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """memaudit's feature cache in a temporary folder, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path_factory.mktemp("memaudit-cache")))
        yield


N_TINY_IMAGES = 8
TINY_RESOLUTION = 16


@pytest.fixture(scope="session")
def tiny_dir_eps(tmp_path_factory):
    """A saved tiny pipeline: epsilon prediction, DDIM scheduler, 3 image channels, 16 px."""
    from memaudit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "eps", prediction_type="epsilon", scheduler="ddim",
                              image_channels=3, resolution=TINY_RESOLUTION)


@pytest.fixture(scope="session")
def tiny_dir_v(tmp_path_factory):
    """A saved tiny pipeline: v prediction, DPM-Solver scheduler, 3 image channels, 16 px."""
    from memaudit.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "v", prediction_type="v_prediction", scheduler="dpm",
                              image_channels=3, resolution=TINY_RESOLUTION)


def make_tiny_dataset(n: int = N_TINY_IMAGES, channels: int = 3, resolution: int = TINY_RESOLUTION, seed: int = 0):
    """``n`` seeded random images in [0, 1] (stored in [-1, 1]) with distinct captions."""
    from memaudit.data import from_arrays

    rng = np.random.default_rng(seed)
    shape = (n, resolution, resolution, channels) if channels == 3 else (n, resolution, resolution)
    images = rng.random(shape, dtype=np.float32)
    captions = [f"a photo of item {i}" for i in range(n)]
    return from_arrays(images, captions)


@pytest.fixture(scope="session")
def tiny_dataset():
    """8 random RGB 16x16 images with distinct captions (seeded; do not modify it in a test)."""
    return make_tiny_dataset()


@pytest.fixture
def make_dataset():
    """The dataset builder itself, for tests that need other sizes or channel counts."""
    return make_tiny_dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_dataset):
    """The tiny dataset as a folder of PNGs with captions.csv, as a user passes it to --train (do not modify it)."""
    from memaudit.testing import save_image_folder

    return save_image_folder(tiny_dataset, tmp_path_factory.mktemp("data"))


@pytest.fixture
def copying_sampler(monkeypatch):
    """``copying_sampler(train)``: every audit sampler in this test returns, for each prompt, its training image
    (an in-memory dataset) plus a little seeded noise, so every prompt's generations are near-copies of its image."""
    from memaudit.sampling import Sampler

    def install(train):
        by_caption = {c: (train.images[i] + 1) / 2 for i, c in enumerate(train.captions)}

        def sample_batch(self, prompts, seeds):
            g = torch.Generator().manual_seed(int(seeds[0]) % 2**31)
            images = torch.stack([by_caption[p] for p in prompts])
            images = (images + 1e-3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
            norms = torch.rand(len(prompts), self.steps, generator=g)
            return images, norms, torch.arange(self.steps), {d.name: norms[:, 0] for d in self.detectors}

        monkeypatch.setattr(Sampler, "sample_batch", sample_batch)

    return install


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``run_cli(*args)``: ``memaudit ARGS`` run in this process (``memaudit.cli.main``, as the console script runs
    it), with its exit code and output as a finished subprocess would give them (``returncode``, ``stdout``,
    ``stderr``). One subprocess smoke test (tests/cli/test_cli.py) keeps the real entry point covered."""
    import sys
    from types import SimpleNamespace

    from memaudit import cli

    def run(*args) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["memaudit", *map(str, args)])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)

    return run


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """An idx file (MNIST's and Fashion-MNIST's format) of uint8 ``array``, gzipped unless ``gz`` is false."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def write_idx():
    """Writes idx files for the bundled settings' build tests (one conftest only: a second one named ``conftest``
    would shadow this module for ``from conftest import ...``)."""
    return _write_idx


def pytest_collection_modifyitems(config, items):
    """Run in parallel (pytest-xdist, ``-n auto`` in pyproject.toml) a file at a time, so a module's fixtures are
    built once; the files that start Ray go first and one after the other on one worker (a Ray instance takes both
    cores of CI's machine; two at once slow each other several-fold), while the other worker runs the rest."""
    for item in items:
        ray = item.get_closest_marker("ray") is not None
        item.add_marker(pytest.mark.xdist_group("ray" if ray else item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)
