"""The mask search, a stage-2 fine-tune and ``memaudit mitigate export`` on the tiny SD3, Flux dev, PixArt-Sigma and
SDXL pipelines, and the search's promise to evaluate on the live denoiser: it is never deep-copied, and after any
number of evaluations (the full fine-tuning reference included) it is bit-for-bit the base again, so an evaluation
scores the same whatever ran before it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytestmark = pytest.mark.slow  # every family end to end: CI runs it; `pytest -m 'not slow'` leaves it out

#: family -> the method searched on it (every search also runs the method's default and full fine-tuning)
SEARCHED = {"sd3": "svdiff", "flux-dev": "lora", "pixart-sigma": "difffit", "sdxl": "attention"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> its tiny pipeline saved as a diffusers folder (built on first use)."""
    from memaudit.tiny_families import tiny_family

    root, folders = tmp_path_factory.mktemp("families"), {}

    def get(family: str):
        if family not in folders:
            folders[family] = root / family
            tiny_family(family).save_pretrained(folders[family], safe_serialization=True)
        return folders[family]

    return get


@pytest.fixture(scope="module")
def images():
    """8 random 32 px RGB images (the tiny families' resolution) with distinct captions."""
    from conftest import make_tiny_dataset

    return make_tiny_dataset(resolution=32)


def _config(method: str, **kw):
    from memaudit.mitigate.search import SearchConfig

    args = dict(method=method, population=2, generations=1, inner_steps=1, batch_size=2, val_fraction=0.25,
                lr_choices=(1e-3,), generations_per_prompt=2, sample_steps=2, quality_features="pixels", device="cpu")
    return SearchConfig(**{**args, **kw})


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _plain(module) -> bool:
    return all(type(m).__module__.split(".")[0] in ("torch", "diffusers") for m in module.modules())


@pytest.mark.parametrize("family", list(SEARCHED))
def test_search_then_stage_two_then_export_on_each_family(tmp_path, family, saved, images, monkeypatch):
    from diffusers import DiffusionPipeline
    from typer.testing import CliRunner

    import memaudit.target
    from memaudit.cli import app
    from memaudit.mitigate.finetune import finetune_with_mask, read_mask
    from memaudit.mitigate.search import run_mask_search
    from memaudit.peft import load_adapter
    from memaudit.target import load_target

    base = saved(family)
    loaded, copied = [], []
    real_load, real_deepcopy = memaudit.target.load_target, copy.deepcopy
    monkeypatch.setattr(memaudit.target, "load_target", lambda *a, **kw: loaded.append(real_load(*a, **kw)) or loaded[-1])
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: copied.append(type(obj)) or real_deepcopy(obj, *a))
    out = tmp_path / "search"
    doc = run_mask_search(str(base), images, out, _config(SEARCHED[family]))
    monkeypatch.undo()
    rows = (out / "evaluations.jsonl").read_text().splitlines()
    assert doc["evaluations"] == len(rows) >= 2 and doc["fine_tunes"]["run_now"] == len(rows) + 2
    # the search worked on the denoiser it loaded, never on a copy, and left it exactly the base
    (target,) = loaded
    den = target.denoiser
    assert type(den) not in copied
    fresh = load_target(base, device="cpu", dtype="float32").denoiser
    assert _same(_state(den), _state(fresh)) and _plain(den) and "peft_config" not in den.__dict__
    assert not den.training and not any(p.requires_grad or p.grad is not None for p in den.parameters())
    mask = read_mask(out)
    assert mask["method"] == SEARCHED[family] and len(mask["mask"]) == len(mask["units"])
    if family != "sdxl":
        assert mask["units"][0] in ("stem", "transformer_blocks.0")
        assert set(mask["units"]) <= {"stem", *target.family.blocks(den)}
    # stage 2 with the chosen mask, then its adapter merged into a plain pipeline of the family's class
    ft = tmp_path / "stage2"
    finetune_with_mask(str(base), images, out / "mask.json", ft, steps=1, batch_size=2, device="cpu")
    res = CliRunner().invoke(app, ["mitigate", "export", str(ft / "adapter"), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    merged = DiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert type(merged) is type(target.pipe)
    expected = load_target(base, device="cpu", dtype="float32")
    load_adapter(ft / "adapter", expected.denoiser).merge()
    assert _same(_state(target.family.denoiser(merged)), _state(expected.denoiser))


@pytest.mark.parametrize("family", ["sd3", "flux-dev"])
def test_an_evaluation_scores_the_same_whatever_ran_before_it(family, saved, images):
    """Evaluator A runs a mask, another mask and full fine-tuning (which trains every base tensor in place) before
    the mask under test; evaluator B, on a freshly loaded base, runs an all-zero mask (no training) before it. Both
    scores are the same, and A's denoiser is the base again."""
    from memaudit.mitigate.search import MaskEvaluator
    from memaudit.target import load_target

    method = {"sd3": "difffit", "flux-dev": "svdiff"}[family]
    cfg = _config(method, inner_steps=2)
    proxy, val = images.subset([0, 1, 2]), images.subset([3, 4, 5])
    a_target = load_target(saved(family), device="cpu", dtype="float32")
    base = _state(a_target.denoiser)
    a = MaskEvaluator(a_target, proxy, val, cfg)
    n = len(a.units)
    assert _same(_state(a_target.denoiser), base) and _plain(a_target.denoiser)  # listing the units left no trace
    under_test = [1] * n
    a(under_test, 1e-2)
    a([i % 2 for i in range(n)], 1e-2)
    full = a(None, 1e-2, method="full")
    assert full["trainable_parameters"] == sum(p.numel() for p in a_target.denoiser.parameters())
    after = a(under_test, 1e-2)
    assert _same(_state(a_target.denoiser), base) and _plain(a_target.denoiser)
    b = MaskEvaluator(load_target(saved(family), device="cpu", dtype="float32"), proxy, val, cfg)
    assert b([0] * n, 1e-2)["inner_steps"] == 0
    alone = b(under_test, 1e-2)
    assert after["objectives"]["memorization"] == alone["objectives"]["memorization"]
    assert after["objectives"]["quality"] == pytest.approx(alone["objectives"]["quality"], rel=1e-5)
    assert after["trainable_parameters"] == alone["trainable_parameters"] > 0


def test_a_method_with_nothing_to_train_is_refused_before_the_search(tmp_path, saved, images):
    from memaudit.core.errors import ConfigError
    from memaudit.mitigate.search import run_mask_search

    with pytest.raises(ConfigError, match="--method norm has nothing to train on .*PixArtTransformer2DModel"):
        run_mask_search(str(saved("pixart-sigma")), images, tmp_path / "s", _config("norm"))
    assert not (tmp_path / "s" / "search.json").exists()
    assert json.loads(json.dumps(_config("norm").to_dict()))["method"] == "norm"
