"""Fixtures of the bundled settings' tests."""

from __future__ import annotations

import gzip

import numpy as np
import pytest


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """An idx file (MNIST's and Fashion-MNIST's format) of uint8 ``array``, gzipped unless ``gz`` is false."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def write_idx():
    return _write_idx
