"""``--redact`` leaves no training pixel in any output file: distinctive training images are planted, a model that
copies them is audited, and every byte under ``--out`` is searched for them (raw bytes, the feature vectors a faiss
index would hold, and every PNG, embedded in the HTML or not, decoded and scanned tile by tile). The same search
finds them in an unredacted audit and in the feature cache, so it is known to see them."""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memaudit.audit import AuditConfig, run_audit
from memaudit.data import from_arrays
from memaudit.features import get_extractor

N, RES = 4, 16


@pytest.fixture(scope="module")
def planted():
    """Distinctive images: high-contrast random checkerboards, one per caption."""
    g = torch.Generator().manual_seed(7)
    images = (torch.rand(N, 3, RES, RES, generator=g) > 0.5).float() * 0.9 + 0.05
    return from_arrays(images, [f"patient scan {i}" for i in range(N)])


def _needles(train) -> list[bytes]:
    """Byte strings that betray a training image: its uint8 pixels (HWC and CHW), its float32 pixels, and its
    L2-normalized pixel features as a faiss index stores them."""
    x01 = (train.images + 1) / 2
    feats = get_extractor("pixels")(x01).numpy().astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    out = []
    for k in range(len(train)):
        u8 = (x01[k].clamp(0, 1) * 255).round().byte()
        out += [u8.permute(1, 2, 0).numpy().tobytes()[:48], u8.numpy().tobytes()[:48],
                x01[k].numpy().astype(np.float32).tobytes()[:64], feats[k, :16].tobytes()]
    return out


def _pngs(data: bytes) -> list[bytes]:
    """The PNG file itself, or every PNG embedded as a base64 data URI in an HTML/JSON file."""
    if data.startswith(b"\x89PNG"):
        return [data]
    return [base64.b64decode(m) for m in re.findall(rb"data:image/png;base64,([A-Za-z0-9+/=]+)", data)]


def _shows_a_training_image(png: bytes, train) -> bool:
    """True when a tile of the picture, at any whole enlargement up to 8, is a training image (max error 3/255)."""
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    targets = [((train.images[k] + 1) / 2 * 255).round().to(torch.int16).permute(1, 2, 0).numpy() for k in range(len(train))]
    for scale in range(1, 9):
        small = arr[::scale, ::scale]
        for y in range(0, small.shape[0] - RES + 1, RES):
            for x in range(0, small.shape[1] - RES + 1, RES):
                tile = small[y : y + RES, x : x + RES]
                if any(np.abs(tile - t).max() <= 3 for t in targets):
                    return True
    return False


def leaks(folder: Path, train) -> list[str]:
    """Every file under ``folder`` that holds a training image, with how."""
    found = []
    needles = _needles(train)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if any(n in data for n in needles):
            found.append(f"{path.relative_to(folder)}: raw bytes")
        elif any(_shows_a_training_image(png, train) for png in _pngs(data)):
            found.append(f"{path.relative_to(folder)}: picture")
    return found


def _config(**kw):
    return AuditConfig(**{"generations": 4, "min_clique": 3, "steps": 2, "batch_size": 4, "device": "cpu", **kw})


def test_redacted_audit_holds_no_training_pixel(tmp_path, monkeypatch, tiny_dir_eps, planted, copying_sampler):
    monkeypatch.setenv("MEMAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    copying_sampler(planted)
    # the search sees them: an unredacted audit shows the training images, and the feature cache holds them
    res = run_audit(str(tiny_dir_eps), planted, tmp_path / "open", config=_config())
    assert res["summary"]["extracted_training_images"] == N
    open_leaks = leaks(tmp_path / "open", planted)
    assert any(f.startswith("train/") for f in open_leaks) and any("report.html" in f for f in open_leaks), open_leaks
    assert any(f.endswith(".faiss: raw bytes") for f in leaks(tmp_path / "cache", planted))

    res = run_audit(str(tiny_dir_eps), planted, tmp_path / "shared", config=_config(redact=True))
    assert res["summary"]["extracted_training_images"] == N and res["redacted"]
    assert leaks(tmp_path / "shared", planted) == []
    assert all(p["train_image"] is None and p["grid"] is None and p["grid_withheld"] for p in res["prompts"])
    assert not os.path.exists(tmp_path / "shared" / "cache")
