"""The audit end to end on tiny models: planted copies are caught at every prompt, noise never is, and every user
mistake stops with one line before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from memaudit.audit import AuditConfig, read_prompts, run_audit
from memaudit.core.errors import ConfigError, DataError
from memaudit.data import from_arrays
from memaudit.sampling import Sampler

N_TRAIN = 6


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(N_TRAIN, 3, 16, 16, generator=g)
    return from_arrays(images, [f"a photo of item {i}" for i in range(N_TRAIN)])


def _fake_sampler(monkeypatch, train, kind: str):
    """Replace sampling: 'copy' returns the prompt's own training image (plus 1e-3 noise), 'noise' uniform noise."""
    by_caption = {c: (train.images[i] + 1) / 2 for i, c in enumerate(train.captions)}

    def sample_batch(self, prompts, seeds):
        g = torch.Generator().manual_seed(int(seeds[0]) % 2**31)
        if kind == "copy":
            images = torch.stack([by_caption[p] for p in prompts])
            images = (images + 1e-3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        else:
            images = torch.rand(len(prompts), 3, 16, 16, generator=g)
        norms = torch.rand(len(prompts), self.steps, generator=g)
        return images, norms, torch.arange(self.steps), {d.name: norms[:, 0] for d in self.detectors}

    monkeypatch.setattr(Sampler, "sample_batch", sample_batch)


def _config(**kw):
    return AuditConfig(**{"generations": 6, "min_clique": 4, "steps": 2, "batch_size": 5, "device": "cpu", **kw})


def test_planted_copies_are_caught_at_every_prompt(tmp_path, monkeypatch, tiny_dir_eps, train):
    _fake_sampler(monkeypatch, train, "copy")
    stages = []
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", config=_config(),
                    progress=lambda s, d, t: stages.append((s, d, t)))
    assert all(p["flagged"] and p["extracted"] for p in res["prompts"])
    training = [(d, t) for s, d, t in stages if s == "training features"]
    assert training[0] == (0, N_TRAIN) and training[-1] == (N_TRAIN, N_TRAIN)  # images done of the set
    assert [p["nearest_train_index"] for p in res["prompts"]] == list(range(N_TRAIN))
    assert res["summary"]["extracted_training_images"] == N_TRAIN
    assert res["summary"]["amd"] < 1e-3
    rows = [r for r in res["images"] if r["prompt_index"] == 2]
    assert all(r["nearest_train_index"] == 2 for r in rows)
    assert (tmp_path / "out" / "report.html").exists() and (tmp_path / "out" / "train").is_dir()


def test_noise_is_never_flagged(tmp_path, monkeypatch, tiny_dir_eps, train):
    _fake_sampler(monkeypatch, train, "noise")
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", config=_config())
    assert not any(p["flagged"] or p["extracted"] for p in res["prompts"])
    assert res["summary"]["flagged_prompts"] == 0 and res["summary"]["extracted_training_images"] == 0
    assert res["summary"]["amd"] > 0.05


def test_real_sampling_records_settings_and_reuses_the_index(tmp_path, tiny_dir_eps, train):
    cfg = _config(generations=2, min_clique=2, steps=2)
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", prompts=train.captions[:2],
                    reference_prompts=["a red square", "a blue circle"], config=cfg)
    assert res["summary"]["n_images"] == 4 and res["summary"]["denoising_threshold"] is not None
    assert len(res["reference_prompts"]) == 2
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["generations"] == 2 and saved["seeds"]["seed"] == 0
    assert res["summary"]["n_train"] == len(train) and res["summary"]["reference_amd"] is not None
    cache = Path(os.environ["MEMAUDIT_CACHE_DIR"]) / "features"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert any(name.endswith(".faiss") for name in mtimes)
    assert not (tmp_path / "out" / "cache").exists()  # the index of training features stays out of --out
    run_audit(str(tiny_dir_eps), train, tmp_path / "out", prompts=train.captions[:2], config=cfg)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes
    # a cache folder of the user's choice
    run_audit(str(tiny_dir_eps), train, tmp_path / "out2", prompts=train.captions[:2],
              config=_config(generations=2, min_clique=2, steps=2, cache_dir=str(tmp_path / "mine")))
    assert list((tmp_path / "mine" / "features").glob("index-*.faiss"))


def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n")
    assert read_prompts(tmp_path / "p.csv") == ["a cat"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_user_mistakes_write_nothing(tmp_path, tiny_dir_eps, train):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no prompts"):
        run_audit(str(tiny_dir_eps), train, out, prompts=tmp_path / "empty.txt", config=_config())
    with pytest.raises(ConfigError, match="does not exist"):
        run_audit(str(tiny_dir_eps), train, out, config=_config(features="nope"))
    gray = from_arrays(torch.rand(3, 1, 16, 16), ["a", "b", "c"])
    with pytest.raises(DataError, match="channel"):
        run_audit(str(tiny_dir_eps), gray, out, config=_config())
    with pytest.raises(ConfigError, match="min clique"):
        _config(generations=3, min_clique=5)
    assert not out.exists()


def test_cli_mistakes_one_line_exit_2(tmp_path, tiny_dir_eps, run_cli):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), color=40 * i).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "out"
    cases = [
        (["--train", str(data)], "grayscale"),  # 1-channel training set, 3-channel model
        (["--train", str(data), "--convert-channels", "--features", "nope"], "does not exist"),
        (["--train", str(data), "--convert-channels", "--prompts", str(tmp_path / "none.txt")], "does not exist"),
    ]
    for extra, needle in cases:
        res = run_cli("audit", str(tiny_dir_eps), "--out", str(out), *extra)
        assert res.returncode == 2, res.stderr
        assert needle in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    no_te = tmp_path / "no_te"
    import shutil

    shutil.copytree(tiny_dir_eps, no_te)
    shutil.rmtree(no_te / "text_encoder")
    res = run_cli("audit", str(no_te), "--train", str(data), "--out", str(out))
    assert res.returncode == 2 and "text_encoder" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


# -- quality, alignment and inference-time mitigations -------------------------------------------------------------
def _heldout(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return from_arrays(torch.rand(n, 3, 16, 16, generator=g), [f"a held-out photo {i}" for i in range(n)])


def _planting_sampler(monkeypatch, heldout, kind: str):
    """Held-out captions get their own held-out image ('copy', plus 1e-3 noise) or uniform noise ('noise')."""
    by_caption = {c: (heldout.images[i] + 1) / 2 for i, c in enumerate(heldout.captions)}

    def sample_batch(self, prompts, seeds):
        g = torch.Generator().manual_seed(int(seeds[0]) % 2**31)
        noise = torch.rand(len(prompts), 3, 16, 16, generator=g)
        if kind == "copy":
            images = torch.stack([by_caption.get(p, noise[k]) for k, p in enumerate(prompts)])
            images = (images + 1e-3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        else:
            images = noise
        norms = torch.rand(len(prompts), self.steps, generator=g)
        return images, norms, torch.arange(self.steps), {d.name: norms[:, 0] for d in self.detectors}

    monkeypatch.setattr(Sampler, "sample_batch", sample_batch)


def test_heldout_quality_separates_copies_from_noise(tmp_path, monkeypatch, tiny_dir_eps, train):
    held = _heldout()
    kids = {}
    for kind in ("copy", "noise"):
        _planting_sampler(monkeypatch, held, kind)
        res = run_audit(str(tiny_dir_eps), train, tmp_path / kind, heldout=held,
                        config=_config(quality_features="pixels", quality_feature_options={"size": 4}))
        q = res["summary"]["quality"]
        assert q["n_real"] == 5 and q["n_fake"] == 5 * 6 and q["recommended"] == "kid"
        assert res["summary"]["denoising_threshold"] is not None  # held-out captions became the reference prompts
        assert len(res["reference_prompts"]) == 5
        kids[kind] = q["kid"]
    # generations that are the held-out images themselves are much closer to them than noise is
    assert kids["copy"] < 0.1 * kids["noise"], kids
    html = (tmp_path / "copy" / "report.html").read_text()
    assert "KID (held-out)" in html


def test_alignment_scores_are_the_scorers_mean(tmp_path, monkeypatch, tiny_dir_eps, train):
    from memaudit.metrics.alignment import register_scorer

    def factory(device="cpu"):
        # 1.0 for images whose prompt mentions item 0, 0.5 for other items, NaN (cannot judge) otherwise
        return lambda images, prompts: [1.0 if p.endswith("item 0") else 0.5 if "item" in p else float("nan")
                                        for p in prompts]

    register_scorer("test-items", factory)
    _fake_sampler(monkeypatch, train, "noise")
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", config=_config(alignment="test-items"))
    a = res["summary"]["alignment"]
    assert a["scorer"] == "test-items" and a["n_images"] == N_TRAIN * 6
    assert a["mean"] == pytest.approx((1.0 + 0.5 * (N_TRAIN - 1)) / N_TRAIN)
    assert {r["alignment"] for r in res["images"]} == {1.0, 0.5}


def test_rwa_at_inference_perturbs_every_generation_reproducibly(tmp_path, tiny_dir_eps, train):
    cfg = _config(generations=3, min_clique=2, steps=2, mitigation="rwa", rwa_words=2)
    runs = [run_audit(str(tiny_dir_eps), train, tmp_path / f"out{r}", prompts=train.captions[:2], config=cfg)
            for r in range(2)]
    rows = runs[0]["images"]
    for row in rows:
        original = train.captions[row["prompt_index"]].split()
        used = row["prompt_used"].split()
        assert len(used) == len(original) + 2
        it = iter(used)
        assert all(word in it for word in original)  # the caption's own words keep their order
    assert len({r["prompt_used"] for r in rows}) == len(rows)  # every generation has its own perturbation
    assert [r["prompt_used"] for r in rows] == [r["prompt_used"] for r in runs[1]["images"]]
    assert runs[0]["summary"]["mitigation"]["kind"] == "rwa"


def test_threshold_at_inference_uses_the_reference_median_and_lowers_the_norm(tmp_path, tiny_dir_eps, train):
    from memaudit.target import load_target

    reference = ["a red square", "a blue circle"]
    cfg = _config(generations=2, min_clique=2, steps=2, mitigation="threshold", mitigation_steps=5, mitigation_lr=0.5)
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", prompts=train.captions[:3],
                    reference_prompts=reference, config=cfg)
    m = res["summary"]["mitigation"]
    sampler = Sampler(load_target(tiny_dir_eps, device="cpu"), steps=2, batch_size=5, seed=1)
    expected = float(sampler.first_step_norms(reference, 2).median())
    assert m["norm_target"] == pytest.approx(expected, rel=1e-5)
    assert m["images"] == 6 and m["first_step_norm_after_mean"] < m["first_step_norm_before_mean"]
    with pytest.raises(ConfigError, match="needs reference prompts"):
        run_audit(str(tiny_dir_eps), train, tmp_path / "x", config=cfg)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="--mitigation"):
        _config(mitigation="blur")
    with pytest.raises(ConfigError, match="--mitigation-target"):
        _config(mitigation="threshold", mitigation_target="low")
