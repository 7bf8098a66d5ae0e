"""Tests for memaudit.finetune and ``memaudit finetune``: settings file, mitigations, resume after a crash."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memaudit.core.errors import ConfigError, DataError
from memaudit.core.outputs import partial_dir
from memaudit.finetune import SETTINGS_FILE, FinetuneConfig, finetune
from memaudit.target import Target, load_target
from memaudit.testing import save_image_folder


class Crash(Exception):
    pass


def _cfg(**kw) -> FinetuneConfig:
    base = dict(steps=6, batch_size=2, learning_rate=1e-3, seed=3, checkpoint_every=2, caption_dropout=0.1)
    base.update(kw)
    return FinetuneConfig(**base)


def _unet(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_target(path, device="cpu").unet.state_dict().items()}


@pytest.mark.parametrize("mitigation", ["none", "rwa", "threshold"])
def test_interrupted_and_resumed_ends_at_the_uninterrupted_weights(tmp_path, tiny_dir_eps, tiny_dataset, mitigation):
    cfg = _cfg(mitigation=mitigation)
    whole = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "whole", cfg, device="cpu")
    assert whole["result"]["resumed_from_step"] is None

    def crash_at_5(step, total, logs):
        if step == 5:
            raise Crash

    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        finetune(tiny_dir_eps, tiny_dataset, out, cfg, device="cpu", progress=crash_at_5)
    assert not out.exists()  # nothing half-written: the result appears only when finished
    assert (partial_dir(out) / "checkpoints").is_dir()
    recorded = json.loads((partial_dir(out) / "wall.json").read_text())["wall_time_s"]  # at the step-4 checkpoint
    seen = []
    resumed = finetune(tiny_dir_eps, tiny_dataset, out, cfg, device="cpu", progress=lambda s, t, logs: seen.append(s))
    assert resumed["result"]["resumed_from_step"] == 4 and seen == [5, 6]
    assert resumed["result"]["wall_time_s"] > recorded > 0  # the wall time counts the run it resumed
    assert not partial_dir(out).exists()
    a, b = _unet(tmp_path / "whole"), _unet(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["result"]["stats"] == whole["result"]["stats"]
    base = _unet(tiny_dir_eps)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training did change the UNet


def test_settings_file_and_plain_diffusers_loads_the_result(tmp_path, tiny_dir_eps, tiny_dataset):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ft"
    finetune(tiny_dir_eps, tiny_dataset, out, _cfg(mitigation="rwa", rwa_words=3), device="cpu")
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["settings"]["mitigation"] == "rwa" and settings["settings"]["rwa_words"] == 3
    assert settings["seeds"]["seed"] == 3 and "torch" in settings["versions"]
    assert settings["trainable_percent"] == pytest.approx(100.0)
    assert len(settings["train_sha256"]) == 64
    assert settings["result"]["stats"]["rwa_perturbed"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.unet is not None


def test_threshold_counts_dropped_samples(tmp_path, tiny_dir_eps, tiny_dataset):
    # a threshold below every strength drops every sample (no empty captions, whose strength is 0): every step is
    # skipped and the UNet is unchanged
    out = tmp_path / "ft"
    s = finetune(tiny_dir_eps, tiny_dataset, out, _cfg(mitigation="threshold", threshold=1e-9, steps=3, caption_dropout=0.0), device="cpu")
    assert s["result"]["skipped_steps"] == 3
    assert s["result"]["stats"]["threshold_dropped"] == s["result"]["stats"]["threshold_seen"] == 6
    a, b = _unet(out), _unet(tiny_dir_eps)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refuses_to_mix_runs_and_to_overwrite(tmp_path, tiny_dir_eps, tiny_dataset):
    out = tmp_path / "ft"

    def crash(step, total, logs):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        finetune(tiny_dir_eps, tiny_dataset, out, _cfg(), device="cpu", progress=crash)
    with pytest.raises(ConfigError, match="other settings"):
        finetune(tiny_dir_eps, tiny_dataset, out, _cfg(learning_rate=2e-3), device="cpu")
    finetune(tiny_dir_eps, tiny_dataset, out, _cfg(), device="cpu")
    with pytest.raises(ConfigError, match="already holds a finished fine-tune"):
        finetune(tiny_dir_eps, tiny_dataset, out, _cfg(), device="cpu")
    finetune(tiny_dir_eps, tiny_dataset, out, _cfg(steps=2), device="cpu", overwrite=True)
    assert json.loads((out / SETTINGS_FILE).read_text())["result"]["steps"] == 2


@pytest.mark.parametrize("kw, match", [
    (dict(method="dora"), "--method"), (dict(granularity="row"), "--granularity"),
    (dict(mask=[0, 2]), "mask"), (dict(mitigation="dropout"), "--mitigation"),
    (dict(threshold="high"), "--threshold"), (dict(threshold=-1.0), "--threshold"),
    (dict(rwa_words=-1), "RWA words"), (dict(rwa_probability=2.0), "probability"),
    (dict(steps=0), "steps"), (dict(save_dtype="int8"), "save dtype"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw)


def test_cli_finetune_and_its_errors(tmp_path, tiny_dir_eps, data_dir):
    from memaudit.cli import app

    data = data_dir
    runner = CliRunner()
    out = tmp_path / "ft"
    res = runner.invoke(app, ["finetune", str(tiny_dir_eps), "--train", str(data), "--out", str(out), "--steps", "3",
                              "--batch-size", "2", "--mitigation", "threshold", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "threshold: dropped" in res.output and (out / SETTINGS_FILE).is_file()
    res = runner.invoke(app, ["finetune", str(tiny_dir_eps), "--train", str(data), "--out", str(tmp_path / "x"),
                              "--mitigation", "bogus"])
    assert res.exit_code != 0 and "--mitigation 'bogus' is not known" in str(res.exception)
    assert not (tmp_path / "x").exists() and not partial_dir(tmp_path / "x").exists()


def test_peft_method_with_mask_resumes_and_saves_its_adapter(tmp_path, tiny_dir_eps, tiny_dataset):
    from memaudit.peft import get_method, load_adapter

    n_units = len(get_method("svdiff", load_target(tiny_dir_eps, device="cpu").unet).units())
    mask = [1, 0] * (n_units // 2) + [1] * (n_units % 2)
    cfg = _cfg(method="svdiff", mask=mask, learning_rate=1e-2)
    whole = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "whole", cfg, device="cpu")
    assert 0 < whole["trainable_percent"] < 100

    def crash_at_3(step, total, logs):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        finetune(tiny_dir_eps, tiny_dataset, tmp_path / "resumed", cfg, device="cpu", progress=crash_at_3)
    finetune(tiny_dir_eps, tiny_dataset, tmp_path / "resumed", cfg, device="cpu")
    a, b = _unet(tmp_path / "whole"), _unet(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the adapter rebuilds the merged pipeline's UNet from the base
    base = load_target(tiny_dir_eps, device="cpu")
    method = load_adapter(tmp_path / "whole" / "adapter", base.unet)
    assert method.name == "svdiff"
    method.merge()
    merged = base.unet.state_dict()
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)


def test_an_all_zero_mask_writes_the_base_unchanged(tmp_path, tiny_dir_eps, tiny_dataset):
    from memaudit.peft import get_method

    n_units = len(get_method("difffit", load_target(tiny_dir_eps, device="cpu").unet).units())
    s = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "ft", _cfg(method="difffit", mask=[0] * n_units), device="cpu")
    assert s["result"]["steps"] == 0 and s["trainable_parameters"] == 0
    a, b = _unet(tmp_path / "ft"), _unet(tiny_dir_eps)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mask_that_does_not_fit_stops_before_writing(tmp_path, tiny_dir_eps, tiny_dataset):
    out = tmp_path / "ft"
    with pytest.raises(ConfigError, match="mask has 2 bits"):
        finetune(tiny_dir_eps, tiny_dataset, out, _cfg(method="svdiff", mask=[0, 1]), device="cpu")
    assert not out.exists() and not partial_dir(out).exists()


# -- the latent cache ---------------------------------------------------------------------------------------------
def _png_folder(path, dataset):
    return save_image_folder(dataset, path)


def _count_encodes(monkeypatch) -> list[int]:
    encoded: list[int] = []
    real = Target.encode_images
    monkeypatch.setattr(Target, "encode_images",
                        lambda self, images, batch_size=64: encoded.append(len(images)) or real(self, images, batch_size))
    return encoded


def test_settings_say_the_latent_cache_was_built_then_reused(tmp_path, tiny_dir_eps, tiny_dataset, monkeypatch):
    encoded = _count_encodes(monkeypatch)
    cache = tmp_path / "cache"
    first = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "a", _cfg(steps=2), device="cpu", cache_dir=cache)
    assert encoded == [8]
    second = finetune(tiny_dir_eps, tiny_dataset, tmp_path / "b", _cfg(steps=2, seed=4), device="cpu", cache_dir=cache)
    assert encoded == [8]  # the second fine-tune encodes nothing
    on_disk = json.loads((tmp_path / "b" / SETTINGS_FILE).read_text())["latent_cache"]
    assert on_disk == second["latent_cache"]
    for s, status, found, new in ((first, "built", 0, 8), (second, "reused", 8, 0)):
        c = s["latent_cache"]
        assert (c["status"], c["found"], c["encoded"], c["images"]) == (status, found, new, 8)
        assert c["path"].startswith(str(cache / "latents"))
    assert first["latent_cache"]["path"] == second["latent_cache"]["path"]
    assert first["train_sha256"] == tiny_dataset.content_key(captions=True)  # no pixel is hashed


def test_a_fine_tune_from_a_folder_streams_and_matches_its_pixels_in_memory(tmp_path, tiny_dir_eps, make_dataset,
                                                                           monkeypatch):
    from memaudit.data import ImageCaptionDataset, load_dataset

    data = _png_folder(tmp_path / "data", make_dataset(n=10, seed=6))
    ds = load_dataset(data, 16, 3)
    in_memory = ImageCaptionDataset(ds.captions, ds.names, images=ds.read(range(10)))
    finetune(tiny_dir_eps, in_memory, tmp_path / "mem", _cfg(steps=3), device="cpu", cache_dir=tmp_path / "c")
    real_read = ImageCaptionDataset.read

    def read(self, indices):
        out = real_read(self, indices)
        assert len(out) <= 2, "a read of more than a batch"
        return out

    monkeypatch.setattr(ImageCaptionDataset, "read", read)
    stages = []
    s = finetune(tiny_dir_eps, data, tmp_path / "disk", _cfg(steps=3), device="cpu", cache_dir=tmp_path / "c",
                 cache_progress=lambda done, total: stages.append((done, total)))
    assert stages == [(10, 10)] and s["latent_cache"]["encoded"] == 10  # other keys than the in-memory images
    a, b = _unet(tmp_path / "mem"), _unet(tmp_path / "disk")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreadable_image_stops_the_fine_tune_before_anything_is_written(tmp_path, tiny_dir_eps, make_dataset):
    import numpy as np
    from PIL import Image

    data = _png_folder(tmp_path / "data", make_dataset(n=10, seed=7))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "3.png")
    cut = (data / "3.png").read_bytes()
    (data / "3.png").write_bytes(cut[: len(cut) // 2])  # the header reads: only decoding fails
    out, cache = tmp_path / "ft", tmp_path / "cache"
    with pytest.raises(DataError) as e:
        finetune(tiny_dir_eps, data, out, _cfg(steps=2), device="cpu", cache_dir=cache)
    assert "3.png" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not partial_dir(out).exists()
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # no entry, no temporary file


def test_cli_finetune_shows_and_reports_the_latent_cache(tmp_path, tiny_dir_eps, data_dir):
    from memaudit.cli import app

    runner, cache = CliRunner(), tmp_path / "cache"
    args = ["finetune", str(tiny_dir_eps), "--train", str(data_dir), "--steps", "2", "--batch-size", "2",
            "--device", "cpu", "--cache-dir", str(cache)]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "latent cache: 8/8 (100%)" in res.stderr  # the progress stage
    assert "latent cache: 8 image(s) encoded now, 0 found" in " ".join(res.stdout.split())
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "latent cache: 0 image(s) encoded now, 8 found" in " ".join(res.stdout.split())
    assert "latent cache:" not in res.stderr  # nothing to encode: no progress stage
    assert list((cache / "latents").rglob("chunk-*.npy"))


def test_a_base_changed_in_place_is_not_resumed(tmp_path, tiny_dir_eps, tiny_dataset):
    """The fine-tune knows its base by content: re-tuned in place under the same path, it is another base."""
    import shutil

    base, out = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(tiny_dir_eps, base)

    def crash(step, total, logs):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        finetune(str(base), tiny_dataset, out, _cfg(), device="cpu", progress=crash)
    original = (base / "unet" / "config.json").read_bytes()
    (base / "unet" / "config.json").write_text(json.dumps({**json.loads(original), "_note": "re-tuned"}))
    with pytest.raises(ConfigError, match=r"\(differing: the base model's files\)"):
        finetune(str(base), tiny_dataset, out, _cfg(), device="cpu")
    (base / "unet" / "config.json").write_bytes(original)
    with pytest.raises(ConfigError, match=r"\(differing: --learning-rate\)"):
        finetune(str(base), tiny_dataset, out, _cfg(learning_rate=2e-3), device="cpu")
