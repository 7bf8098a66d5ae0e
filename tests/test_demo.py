"""The bundled demo: recipe, models loadable by plain diffusers, and real memorization."""

from __future__ import annotations

import json

import pytest
import torch

from memaudit import demo
from memaudit.demo.build import ZooSettings, face_captions
from memaudit.demo.check import normalized_l2, reproduction_check

pytestmark = pytest.mark.slow  # the demo end to end: CI runs it; `pytest -m 'not slow'` leaves it out


def test_faces_recipe_is_deterministic_and_complete():
    rows = demo.read_faces_csv()
    assert [r["lfw_index"] for r in rows] == list(range(100))
    assert sum(r["split"] == "train" for r in rows) == ZooSettings().n_train_faces == 80
    assert {r["split"] for r in rows} == {"train", "heldout"}
    captions = [r["caption"] for r in rows]
    assert len(set(captions)) == 100
    assert captions == face_captions(ZooSettings().seed)


def test_faces_dataset_splits():
    train, held = demo.faces_dataset("train"), demo.faces_dataset("heldout")
    assert len(train) == 80 and len(held) == 20
    assert train.images.shape == (80, 1, 32, 32)
    assert float(train.images.min()) >= -1 and float(train.images.max()) <= 1
    assert not set(train.names) & set(held.names)


def test_normalized_l2_hand_value():
    a = torch.zeros(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # one pixel differs by 1 in 4: sqrt(1/4) = 0.5
    assert normalized_l2(a, b).item() == pytest.approx(0.5)
    assert normalized_l2(b, b).item() == pytest.approx(0.0, abs=1e-6)


def test_bundled_full_ft_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(demo.FULL_FT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of the face of person two six two", num_inference_steps=3, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 1)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


@pytest.mark.parametrize("model, expect_reproduced", [("full_ft", True), ("base", False)])
def test_bundled_models_memorize_or_not(model, expect_reproduced):
    rows = [r for r in demo.read_faces_csv() if r["split"] == "train"][:6]
    res, images, refs = reproduction_check(
        str(demo.DEMO_DIR / model), [r["caption"] for r in rows], [r["lfw_index"] for r in rows],
        demo.lfw_images()[:100], generations=1, steps=25, guidance=4.0, seed=0)
    assert images.shape == (6, 1, 32, 32)
    if expect_reproduced:
        assert res.reproduced_faces >= 5
        assert res.median_distance_to_own < 0.06
    else:
        assert res.reproduced_faces == 0
        assert res.median_distance_to_own > 0.2


def test_demo_audit_extracts_faces_and_redacts(tmp_path):
    """A small audit of the bundled full fine-tune: its memorized faces are flagged and extracted, the JSON records
    settings, seeds and versions, and --redact keeps every training pixel out of the outputs."""
    from memaudit.audit import AuditConfig, run_audit

    train = demo.faces_dataset("train")
    prompts = train.captions[:4]
    cfg = AuditConfig(generations=4, min_clique=3, steps=25, guidance=4.0, batch_size=16, device="cpu", redact=True)
    results = run_audit(str(demo.FULL_FT_MODEL), train, tmp_path / "out", prompts=prompts,
                        reference_prompts=demo.faces_dataset("heldout").captions[:3], config=cfg)
    s = results["summary"]
    assert s["n_prompts"] == 4 and s["n_images"] == 16
    assert s["flagged_prompts"] >= 3 and s["extracted_training_images"] >= 3
    for row in results["prompts"]:
        if row["extracted"]:
            assert row["nearest_train_index"] == row["own_train_index"]
        assert row["train_image"] is None
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["settings"]["seed"] == 0 and record["redacted"] is True
    assert {"memaudit", "torch", "diffusers"} <= set(record["versions"])
    assert not (tmp_path / "out" / "train").exists()
    assert (tmp_path / "out" / "report.html").read_text().count("REDACTED") >= 1
    assert not list((tmp_path).glob(".*tmp*"))
