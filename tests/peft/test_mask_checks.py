"""A mask is what it claims (issue 20): ``mask.json`` records the units it was searched on (names, parameter counts,
family, denoiser class), and a mask is refused in one line on a model whose units differ (another width, another
family) instead of being applied bit by bit by position; the search's resume refusal names the setting that differs,
before the model loads."""

from __future__ import annotations

import json
import logging

import pytest

from memaudit.core.errors import ConfigError


def _config(**kw):
    from memaudit.mitigate.search import SearchConfig

    args = dict(method="difffit", population=2, generations=1, inner_steps=1, batch_size=2, val_fraction=0.25,
                lr_choices=(1e-3, 1e-2), generations_per_prompt=2, sample_steps=2, quality_features="pixels",
                device="cpu")
    return SearchConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_dir_eps, tiny_dataset):
    """A finished tiny search (difffit, block units) on the tiny SD pipeline, and its mask.json."""
    from memaudit.mitigate.search import run_mask_search

    out = tmp_path_factory.mktemp("search") / "out"
    run_mask_search(str(tiny_dir_eps), tiny_dataset, out, _config())
    return out


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The tiny SD pipeline with twice the UNet width: the same unit names, other sizes."""
    from memaudit.models import ModelSpec, build_pipeline
    from memaudit.testing import tiny_pipeline

    path = tmp_path_factory.mktemp("wide") / "pipe"
    tokenizer = tiny_pipeline(resolution=16).tokenizer
    build_pipeline(ModelSpec(resolution=16, max_length=16, unet_channels=(16, 32)),
                   tokenizer=tokenizer).save_pretrained(path, safe_serialization=True)
    return path


def test_mask_json_records_its_units_and_model(searched, tiny_dir_eps):
    from memaudit.mitigate.finetune import mask_units, read_mask
    from memaudit.peft import get_method
    from memaudit.target import load_target

    doc = read_mask(searched)
    method = get_method("difffit", load_target(tiny_dir_eps, device="cpu").denoiser, "block")
    assert doc["units"] == [u.name for u in method.units()]
    assert doc["unit_parameters"] == [u.count for u in method.units()]
    assert (doc["family"], doc["denoiser"]) == ("sd", "UNet2DConditionModel")
    made_for = mask_units(doc)
    assert made_for["units"] == [[u.name, u.count] for u in method.units()] and made_for["family"] == "sd"
    method.check_units(made_for)  # the model it was made on: no complaint
    assert len(method.parameters_for(doc["mask"], made_for)) == sum(
        len(u.param_names) for u, b in zip(method.units(), doc["mask"]) if b)


def test_units_of_another_width_are_refused_naming_the_first_unit(searched, wide_dir):
    from memaudit.mitigate.finetune import mask_units, read_mask
    from memaudit.peft import get_method
    from memaudit.target import load_target

    doc = read_mask(searched)
    method = get_method("difffit", load_target(wide_dir, device="cpu").denoiser, "block", base=str(wide_dir))
    assert [u.name for u in method.units()] == doc["units"]  # by position, the bits would fit: same names and number
    with pytest.raises(ConfigError) as info:
        method.parameters_for(doc["mask"], mask_units(doc))
    text = str(info.value)
    first = method.units()[0]
    assert "\n" not in text
    assert f"its unit 0 is stem ({doc['unit_parameters'][0]:,} parameters), here unit 0 is stem ({first.count:,} " \
           "parameters)" in text, text
    assert "made on" in text and "sd, UNet2DConditionModel" in text and str(wide_dir) in text


def test_stage_two_refuses_a_mask_of_another_model_before_writing(searched, wide_dir, data_dir, tmp_path):
    from memaudit.mitigate.finetune import finetune_with_mask
    from memaudit.tiny_families import tiny_family

    sd3 = tmp_path / "sd3"
    tiny_family("sd3").save_pretrained(sd3, safe_serialization=True)
    for base, says in ((wide_dir, "its unit 0 is stem ("), (sd3, "SD3Transformer2DModel")):
        out = tmp_path / f"ft-{base.name}"
        with pytest.raises(ConfigError) as info:
            finetune_with_mask(str(base), data_dir, searched / "mask.json", out, steps=1, batch_size=2, device="cpu",
                               cache_dir=tmp_path / "cache")
        assert "\n" not in str(info.value) and "was made for other units" in str(info.value), str(info.value)
        assert says in str(info.value)
        assert not out.exists() and not (tmp_path / f"ft-{base.name}.partial").exists()


def test_stage_two_on_the_same_model_works_and_a_mask_without_units_warns(searched, tiny_dir_eps, data_dir, tmp_path,
                                                                           caplog):
    from memaudit.mitigate.finetune import finetune_with_mask, read_mask

    doc = read_mask(searched)
    settings = finetune_with_mask(str(tiny_dir_eps), data_dir, searched / "mask.json", tmp_path / "ft", steps=1,
                                  batch_size=2, device="cpu", cache_dir=tmp_path / "cache")
    assert settings["settings"]["mask"] == doc["mask"]
    assert [u for u in settings["method"]["units"]] == doc["units"]
    # a hand-written mask.json without units: applied by position, with a warning that it could not be checked
    bare = {k: v for k, v in doc.items() if k not in ("units", "unit_parameters", "family", "denoiser")}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    with caplog.at_level(logging.WARNING, logger="memaudit.mitigate.finetune"):
        again = finetune_with_mask(str(tiny_dir_eps), data_dir, tmp_path / "bare.json", tmp_path / "ft2", steps=1,
                                   batch_size=2, device="cpu", cache_dir=tmp_path / "cache")
    assert again["settings"]["mask"] == doc["mask"]
    assert any("records no units" in r.getMessage() for r in caplog.records)
    # units that do not match the bits are a broken file, refused when read
    (tmp_path / "broken.json").write_text(json.dumps({**doc, "unit_parameters": doc["unit_parameters"][:-1]}))
    with pytest.raises(ConfigError, match="one per bit of the mask"):
        read_mask(tmp_path / "broken.json")


def test_resume_refusal_names_the_setting_before_the_model_loads(searched, tiny_dir_eps, tiny_dataset, tmp_path,
                                                                monkeypatch):
    import memaudit.target
    from memaudit.mitigate.search import run_mask_search

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(memaudit.target, "load_target", no_loading)
    cases = [({"inner_steps": 2}, str(tiny_dir_eps), "(differing: --inner-steps)"),
             ({"population": 4, "seed": 1}, str(tiny_dir_eps), "(differing: --population, --seed)"),
             ({"memorization": "amd"}, str(tiny_dir_eps), "(differing: --objectives)"),
             ({}, str(tmp_path / "elsewhere"), "(differing: the base model, the base model's files)")]
    for change, base, says in cases:
        with pytest.raises(ConfigError) as info:
            run_mask_search(base, tiny_dataset, searched, _config(**change))
        text = str(info.value)
        assert "\n" not in text and says in text and f"{searched} holds a search made with other settings" in text, text
    # the workers do not change results: they are not compared (and this one fails only at loading)
    with pytest.raises(AssertionError, match="model was loaded"):
        run_mask_search(str(tiny_dir_eps), tiny_dataset, searched, _config())


def test_an_unreadable_search_json_is_one_line(tmp_path, tiny_dir_eps, tiny_dataset):
    from memaudit.mitigate.search import SETTINGS_FILE, check_resume

    out = tmp_path / "out"
    out.mkdir()
    (out / SETTINGS_FILE).write_text('{"kind": "memaudit.search", "sett')
    with pytest.raises(ConfigError) as info:
        check_resume(out, {"settings": {}})
    assert "\n" not in str(info.value) and f"delete {out} to start it over" in str(info.value)


def test_a_base_changed_in_place_is_not_resumed(tiny_dir_eps, tiny_dataset, tmp_path, monkeypatch):
    """The search knows its base by content: re-fine-tuned in place, same path, it is another base."""
    import shutil

    import memaudit.target
    from memaudit.mitigate.search import run_mask_search

    base = tmp_path / "base"
    shutil.copytree(tiny_dir_eps, base)
    out = tmp_path / "out"
    run_mask_search(str(base), tiny_dataset, out, _config())
    config = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps({**config, "_note": "re-tuned"}))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the base was checked")

    monkeypatch.setattr(memaudit.target, "load_target", no_loading)
    with pytest.raises(ConfigError, match=r"\(differing: the base model's files\)"):
        run_mask_search(str(base), tiny_dataset, out, _config())
