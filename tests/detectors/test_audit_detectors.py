"""Detectors in the audit: every chosen detector's score per image, per prompt and per reference prompt in
results.json, its threshold calibrated on the reference prompts, its ROC against the extraction verdicts, its extra
denoiser calls counted, and the choice recorded and part of the journal's identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memaudit.audit import AuditConfig, run_audit
from memaudit.core.errors import ConfigError
from memaudit.data import from_arrays
from memaudit.detectors import available, default_names
from memaudit.metrics.detection import calibrate_threshold
from memaudit.sampling import Sampler

N_TRAIN = 6
REFERENCE = ["a red square", "a blue circle", "a green line", "a yellow dot"]


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(0)
    return from_arrays(torch.rand(N_TRAIN, 3, 16, 16, generator=g), [f"a photo of item {i}" for i in range(N_TRAIN)])


def _config(**kw):
    return AuditConfig(**{"generations": 2, "min_clique": 2, "steps": 3, "batch_size": 4, "device": "cpu", **kw})


def test_every_detector_in_results_with_real_sampling(tmp_path, tiny_dir_eps, train):
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", prompts=train.captions[:3], reference_prompts=REFERENCE,
                    config=_config(detectors="all"))
    names = available()
    assert res["settings"]["detectors"] == names
    for row in res["prompts"]:
        assert list(row["detectors"]) == names and all(np.isfinite(v) for v in row["detectors"].values())
        images = [r for r in res["images"] if r["prompt_index"] == row["index"]]
        for name in names:  # a prompt's score is the mean of its images'
            assert row["detectors"][name] == pytest.approx(np.mean([r["detectors"][name] for r in images]), rel=1e-6)
        # the old key is Wen's all-step score (the default window)
        assert row["denoising_score"] == pytest.approx(row["detectors"]["wen_all"], rel=1e-5)
    for name in names:
        ref = [r["detectors"][name] for r in res["reference_prompts"]]
        summary = res["summary"]["detectors"][name]
        assert summary["threshold"] == pytest.approx(float(calibrate_threshold(np.array(ref), fpr=0.01)))
        assert summary["flagged"] == sum(p["detectors"][name] > summary["threshold"] for p in res["prompts"])
        assert summary["extra_calls_per_image"] in (0, 2) and summary["source"]
    # anisotropy and sharpness: 2 evaluations per image each, audited and reference images alike
    assert res["summary"]["detector_calls"] == 4 * 2 * (3 + len(REFERENCE))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["prompts"][0]["detectors"] == res["prompts"][0]["detectors"]


def test_default_detectors_are_the_free_ones_and_a_journal_records_them(tmp_path, tiny_dir_eps, train):
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", prompts=train.captions[:2], config=_config())
    assert res["settings"]["detectors"] == default_names()
    assert res["summary"]["detector_calls"] == 0
    assert set(res["images"][0]["detectors"]) == set(default_names())


def _planting(monkeypatch, train, planted: set[int]):
    """Planted prompts generate their training image and score 5 + noise on every detector; others noise, 0-1."""
    by_caption = {c: (train.images[i] + 1) / 2 for i, c in enumerate(train.captions)}

    def sample_batch(self, prompts, seeds):
        g = torch.Generator().manual_seed(int(seeds[0]) % 2**31)
        noise = torch.rand(len(prompts), 3, 16, 16, generator=g)
        hit = torch.tensor([train.captions.index(p) in planted if p in by_caption else False for p in prompts])
        images = torch.stack([by_caption[p] if h else noise[k] for k, (p, h) in enumerate(zip(prompts, hit))])
        images = (images + 1e-3 * torch.randn(images.shape, generator=g)).clamp(0, 1)
        score = torch.rand(len(prompts), generator=g) + 5 * hit
        norms = torch.rand(len(prompts), self.steps, generator=g)
        return images, norms, torch.arange(self.steps), {d.name: score for d in self.detectors}

    monkeypatch.setattr(Sampler, "sample_batch", sample_batch)


def test_each_detector_is_judged_against_the_extraction_verdicts(tmp_path, monkeypatch, tiny_dir_eps, train):
    _planting(monkeypatch, train, {0, 3})
    res = run_audit(str(tiny_dir_eps), train, tmp_path / "out", reference_prompts=REFERENCE,
                    config=_config(generations=4, min_clique=3, detectors="wen_first,sharpness"))
    assert [p["extracted"] for p in res["prompts"]] == [i in (0, 3) for i in range(N_TRAIN)]
    for name in ("wen_first", "sharpness"):
        det = res["summary"]["detectors"][name]["detection"]
        assert det["auc"] == 1.0 and det["n_pos"] == 2 and det["n_neg"] == N_TRAIN - 2 + len(REFERENCE)
        summary = res["summary"]["detectors"][name]
        over = [p["index"] for p in res["prompts"] if p["detectors"][name] > summary["threshold"]]
        assert summary["flagged"] == len(over) and {0, 3} <= set(over)  # the planted prompts score 5 and more
    assert list(res["summary"]["detectors"]) == ["wen_first", "sharpness"]
    html = (tmp_path / "out" / "report.html").read_text()
    section = html[html.index("<h2>Detectors</h2>"):]
    assert "<td>wen_first</td>" in section and "<td>sharpness</td>" in section
    assert "ROC curves of every detector" in section  # both classes occurred


def test_another_detector_choice_does_not_resume_a_journal(tmp_path, monkeypatch, tiny_dir_eps, train):
    def crash(self, prompts, seeds):
        raise RuntimeError("the machine went away")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(Sampler, "sample_batch", crash)
        with pytest.raises(RuntimeError, match="went away"):
            run_audit(str(tiny_dir_eps), train, out, prompts=train.captions[:2], config=_config(detectors="wen_first"))
    with pytest.raises(ConfigError, match="detectors"):
        run_audit(str(tiny_dir_eps), train, out, prompts=train.captions[:2], config=_config(detectors="wen_all"))


def test_unknown_detector_is_one_line(run_cli, tiny_dir_eps, tmp_path):
    done = run_cli("audit", tiny_dir_eps, "--train", tmp_path / "nope", "--detectors", "wen", "--out", tmp_path / "o")
    assert done.returncode == 2 and "no detector called 'wen'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_detectors_command_lists_one_per_line(run_cli):
    done = run_cli("detectors")
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and [line.split("\t")[0] for line in lines] == available()
    assert lines[0].split("\t")[1] == "free (default)" and "sharpness\t+2 evaluations per image" in done.stdout
