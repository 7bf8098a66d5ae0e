"""The fashion build end to end on a tiny source and tiny models: every stage runs once, a rerun skips them, and a
build stopped after a stage's training resumes from its checkpoint to the same weights."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict

import numpy as np
from safetensors.torch import load_file

from memaudit.demo import fashion
from memaudit.demo.build_fashion import FashionSettings, build_fashion
from memaudit.models import ModelSpec


def tiny_source(path, write_idx):
    rng = np.random.default_rng(0)
    path.mkdir()
    for split, per_class in (("train", 4), ("t10k", (fashion.PER_LEVEL * len(fashion.COPIES) + fashion.N_HELDOUT) // 10)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(path / f"{split}-labels-idx1-ubyte.gz", labels)
    return path


def test_build_runs_each_stage_once_and_resumes_a_stage_from_its_checkpoint(tmp_path, write_idx):
    settings = FashionSettings(vae_steps=2, vae_batch=4, base_steps=3, base_batch=4, ft_steps=3, ft_batch=4,
                               scorer_steps=2, spec=asdict(ModelSpec(image_channels=1, max_length=16)))
    work, out, source = tmp_path / "work", tmp_path / "out", tiny_source(tmp_path / "source", write_idx)
    info = build_fashion(work, out, settings, source=source, check=False)
    assert {"products", "vae", "base", "full_ft", "scorer"} <= set(info["wall_time_s"])
    assert info["settings"]["base_numbers"] == "attributes" and info["base"]["resumed_from_step"] == 0
    for name in ("base/model_index.json", "full_ft/model_index.json", "products.npz", "scorer.safetensors",
                 "build_info.json"):
        assert (out / name).is_file()
    unet = out / "full_ft" / "unet" / "diffusion_pytorch_model.safetensors"
    first = load_file(unet)
    record = json.loads((out / "build_info.json").read_text())

    assert build_fashion(work, out, settings, source=source, check=False)["wall_time_s"] == record["wall_time_s"]

    shutil.rmtree(out / "full_ft")  # stopped after training, before the stage was saved: resumes at step 3
    recorded = json.loads((work / "full_ft-checkpoints-wall.json").read_text())["wall_time_s"]
    again = build_fashion(work, out, settings, source=source, check=False)
    assert again["full_ft"]["resumed_from_step"] == 3 and again["full_ft"]["step_time_s"] is None
    # the stage's training time counts the first run's (recorded at its last checkpoint) and this one's
    assert again["full_ft"]["train_time_s"] > recorded > 0

    # started over (its checkpoints gone), the stage counts from zero, not from the earlier runs' record
    shutil.rmtree(out / "full_ft")
    shutil.rmtree(work / "full_ft-checkpoints")
    (work / "full_ft-checkpoints-wall.json").write_text('{"wall_time_s": 1000000.0}')
    fresh = build_fashion(work, out, settings, source=source, check=False)
    assert fresh["full_ft"]["resumed_from_step"] == 0 and fresh["full_ft"]["train_time_s"] < 1000
    resumed = load_file(unet)
    assert all(np.array_equal(first[k].float().numpy(), resumed[k].float().numpy()) for k in first)
