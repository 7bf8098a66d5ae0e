"""Tests for memaudit.peft and memaudit.peft on the tiny UNet.

Expected parameter counts are computed here independently of the methods, by walking the UNet's modules.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.peft import (
    PEFTMethod,
    available_methods,
    export_merged,
    get_method,
    load_adapter,
    read_adapter_info,
    registry,
    save_adapter,
)
from memaudit.target import load_target
from memaudit.training import TrainConfig, train_unet

ALL = ["full", "freeze", "bias", "norm", "attention", "svdiff", "difffit", "lora"]
WRAPPING = ["svdiff", "difffit", "lora"]
NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@pytest.fixture(scope="module")
def _pristine(tiny_dir_eps):
    return load_target(tiny_dir_eps, device="cpu")


@pytest.fixture
def target(_pristine):
    """A fresh copy of the tiny pipeline (copying is faster than loading it again)."""
    return copy.deepcopy(_pristine)


def _inputs(target, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *target.latent_shape), generator=g)
    t = torch.tensor([37, 611][:n])
    emb = target.encode_prompts([f"a photo of item {i}" for i in range(n)]).embeds
    return x, t, emb


@torch.no_grad()
def _out(unet, inputs) -> torch.Tensor:
    x, t, emb = inputs
    return unet(x, t, encoder_hidden_states=emb).sample


def _perturb(method: PEFTMethod, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _transformers(unet) -> list[str]:
    from diffusers import Transformer2DModel

    return [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def _expected_count(name: str, unet) -> int:
    """The trainable size of each method, counted by hand from the plain UNet."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    mods = list(unet.named_modules())
    norms = [m for _, m in mods if isinstance(m, NORMS)]
    biases = sum(p.numel() for n, p in unet.named_parameters() if n.endswith(".bias"))
    if name == "full":
        return sum(p.numel() for p in unet.parameters())
    if name == "freeze":
        return 0
    if name == "bias":
        return biases
    if name == "norm":
        return sum(m.weight.numel() + m.bias.numel() for m in norms)
    if name == "attention":
        return sum(p.numel() for _, m in mods if isinstance(m, Attention) for p in m.parameters())
    if name == "svdiff":
        layers = [m for _, m in mods if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        return sum(min(m.weight.shape[0], m.weight[0].numel()) for m in layers) + sum(m.weight.numel() for m in norms)
    if name == "difffit":
        attn = sum(m.to_out[0].out_features for _, m in mods if isinstance(m, Attention))
        ff = sum(m.net[2].out_features for _, m in mods if isinstance(m, FeedForward))
        return biases + sum(m.weight.numel() for m in norms) + attn + ff
    if name == "lora":
        targets = ("to_q", "to_k", "to_v", "to_out.0")
        return sum(4 * (m.in_features + m.out_features) for n, m in mods
                   if isinstance(m, torch.nn.Linear) and n.endswith(targets))
    raise AssertionError(name)


# -- registry -----------------------------------------------------------------------------------------------------
def test_registry_lists_every_method():
    assert available_methods() == sorted(ALL)


def test_default_learning_rates():
    rates = {name: registry.method_class(name).default_lr for name in ALL if name != "freeze"}
    assert rates == {"full": 1e-4, "bias": 1e-3, "norm": 1e-3, "attention": 1e-4, "svdiff": 1e-3, "difffit": 1e-3,
                     "lora": 1e-4}


def test_a_new_method_is_one_class_and_one_registry_line(target, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class ConvIn(PEFTMethod):
        name = "conv_in"

        def _trainable_names(self):
            return ["conv_in.weight", "conv_in.bias"]

    registry.register_method("conv_in", ConvIn)
    m = get_method("conv_in", target.unet)
    assert [u.name for u in m.units()] == ["stem"]
    assert m.summary()["trainable_parameters"] == target.unet.conv_in.weight.numel() + 8


# -- trainable sets and units -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_trainable_count_matches_a_hand_count_and_everything_else_is_frozen(target, name):
    expected = _expected_count(name, target.unet)
    base_size = sum(p.numel() for p in target.unet.parameters())
    m = get_method(name, target.unet)
    params = m.trainable()
    assert sum(p.numel() for p in params.values()) == expected
    assert all(p.requires_grad for p in params.values())
    own = {id(p) for p in params.values()}
    assert not any(p.requires_grad for p in target.unet.parameters() if id(p) not in own)
    assert not any(p.requires_grad for p in target.text_encoder.parameters())
    assert not any(p.requires_grad for p in target.vae.parameters())
    s = m.summary()
    assert s["method"] == name and s["granularity"] == "block"
    assert s["trainable_parameters"] == expected and s["unet_parameters"] == base_size
    assert s["trainable_percent"] == pytest.approx(100 * expected / base_size)
    assert sum(u["count"] for u in s["units"]) == expected


def test_counts_are_ordered_as_the_methods_promise(target):
    counts = {n: _expected_count(n, target.unet) for n in ALL}
    assert counts["freeze"] == 0 < counts["norm"] < counts["bias"] < counts["difffit"] < counts["full"]
    assert counts["attention"] < counts["full"] and counts["svdiff"] < counts["full"]


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("name", ALL)
def test_units_partition_the_trainable_set(target, name, granularity):
    m = get_method(name, target.unet, granularity)
    units = m.units()
    params = m.trainable()
    names = [p for u in units for p in u.param_names]
    assert sorted(names) == sorted(params)  # union is everything ...
    assert len(names) == len(set(names))  # ... and no parameter is in two units
    assert all(u.param_names for u in units)
    assert all(u.count == sum(params[p].numel() for p in u.param_names) for u in units)
    assert len({u.name for u in units}) == len(units)
    again = get_method(name, load_target(target.path, device="cpu").unet, granularity)
    assert [(u.name, u.param_names) for u in again.units()] == [(u.name, u.param_names) for u in units]


@pytest.mark.parametrize("name", [n for n in ALL if n != "freeze"])
def test_block_units_are_one_per_transformer_plus_rest_and_stem(target, name):
    transformers = _transformers(target.unet)
    assert len(transformers) == 7
    m = get_method(name, target.unet, "block")
    units = [u.name for u in m.units()]
    assert [u for u in units if u in transformers] == transformers[:2] + [transformers[-1]] + transformers[2:6]
    blocks = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    others = [u for u in units if u not in transformers]
    if name in ("attention", "lora"):
        assert others == []
    else:
        assert others == ["stem"] + [f"{b}.rest" for b in blocks]
        assert units == ["stem", "down_blocks.0.attentions.0", "down_blocks.0.rest", "down_blocks.1.attentions.0",
                         "down_blocks.1.rest", "mid_block.attentions.0", "mid_block.rest", "up_blocks.0.attentions.0",
                         "up_blocks.0.attentions.1", "up_blocks.0.rest", "up_blocks.1.attentions.0",
                         "up_blocks.1.attentions.1", "up_blocks.1.rest"]


def test_layer_units_are_the_layers_holding_trainable_parameters(target):
    owners = [n for n, mod in target.unet.named_modules() if list(mod.parameters(recurse=False))]
    full = get_method("full", copy.deepcopy(target.unet), "layer")
    assert sorted(u.name for u in full.units()) == sorted(owners)
    lora = get_method("lora", target.unet, "layer")
    targets = [n for n in owners if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert sorted(u.name for u in lora.units()) == sorted(targets)
    assert all(len(u.param_names) == 2 for u in lora.units())  # lora_A and lora_B of one layer together


def test_freeze_has_nothing_to_train(target):
    m = get_method("freeze", target.unet)
    assert m.units() == [] and m.trainable() == {} and m.parameters_for([]) == []
    assert not any(p.requires_grad for p in target.unet.parameters())


# -- installing leaves the model unchanged ------------------------------------------------------------------------
@pytest.mark.parametrize("name", WRAPPING)
def test_freshly_installed_method_leaves_the_output_unchanged(target, name):
    original = copy.deepcopy(target.unet)
    inputs = _inputs(target)
    m = get_method(name, target.unet)
    assert len(m.trainable()) > 0
    adapted = _out(target.unet, inputs)
    reference = _out(original, inputs)
    assert torch.allclose(adapted, reference, atol=1e-5, rtol=0)
    assert torch.equal(adapted, reference)  # exactly: SV-DIFF adds a zero update, DiffFit scales by 1, LoRA's B is 0


def test_svdiff_shift_changes_the_weight_as_the_formula_says(target):
    m = get_method("svdiff", target.unet, "layer")
    inputs = _inputs(target)
    before = _out(target.unet, inputs)  # fills the no-grad weight cache
    layer = target.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    assert [u.param_names for u in m.units() if u.name == "down_blocks.0.resnets.0.conv1"] == [
        ["down_blocks.0.resnets.0.conv1.delta"]]
    w = layer.weight.detach().clone()
    u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    with torch.no_grad():
        layer.delta.copy_(torch.linspace(-1, 1, len(s)))
    expected = (u * torch.relu(s + layer.delta.detach())) @ vh
    assert torch.allclose(layer.effective_weight().reshape(w.shape[0], -1), expected, atol=1e-5)
    assert not torch.equal(_out(target.unet, inputs), before)  # the cache noticed the change


# -- masks and training --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_all_zero_mask_gives_no_parameters(target, name):
    m = get_method(name, target.unet)
    assert m.parameters_for([0] * len(m.units())) == []
    assert not any(p.requires_grad for p in target.unet.parameters())


@pytest.mark.parametrize("name", ["svdiff", "difffit", "lora", "attention", "bias"])
def test_training_with_a_mask_changes_only_the_masked_units(target, tiny_dataset, name):
    m = get_method(name, target.unet)
    units = m.units()
    mask = [1 if i % 2 == 0 else 0 for i in range(len(units))]
    chosen = m.parameters_for(mask)
    params = m.trainable()
    on = [n for u, b in zip(units, mask) if b for n in u.param_names]
    assert [id(p) for p in chosen] == [id(params[n]) for n in on]
    assert all(p.requires_grad == (n in set(on)) for n, p in params.items())
    before = {n: p.detach().clone() for n, p in target.unet.named_parameters()}
    train_unet(target, tiny_dataset, TrainConfig(steps=2, batch_size=2, learning_rate=1e-2, caption_dropout=0.0),
               params=chosen)
    after = dict(target.unet.named_parameters())
    for u, b in zip(units, mask):
        changed = [n for n in u.param_names if not torch.equal(before[n], after[n])]
        if b:
            assert changed, f"unit {u.name} was masked in but did not train"
        else:
            assert changed == [], f"unit {u.name} was masked out but changed"
    method_params = set(params)
    assert all(torch.equal(before[n], p) for n, p in after.items() if n not in method_params)


@pytest.mark.parametrize("bad", [[1, 0], [1] * 14, [2] + [0] * 12, [0.5] + [0] * 12, ["1"] + [0] * 12, 7])
def test_bad_masks_are_config_errors(target, bad):
    m = get_method("svdiff", target.unet)
    assert len(m.units()) == 13
    with pytest.raises(ConfigError, match="mask"):
        m.parameters_for(bad)


def test_a_mask_of_the_wrong_length_says_how_many_units_and_how_to_list_them(target):
    m = get_method("svdiff", target.unet, "layer", base="/models/my base")
    n = len(m.units())
    with pytest.raises(ConfigError) as e:
        m.parameters_for([1, 0])
    assert str(e.value) == (f"mask has 2 bits but method svdiff at layer granularity has {n} units on /models/my base; "
                            "pass one 0/1 value per unit, in the order that `memaudit mitigate units '/models/my base' "
                            "--method svdiff --granularity layer` lists them.")
    m.merge()
    unknown = get_method("svdiff", target.unet)  # no base given: the command names BASE
    with pytest.raises(ConfigError, match="has 13 units; .*`memaudit mitigate units BASE --method svdiff --granularity "
                                          "block`"):
        unknown.check_mask([1])


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("name", ["svdiff", "difffit", "lora", "freeze"])
def test_unit_table_lists_the_units_in_mask_order_with_their_share(target, name, granularity):
    from memaudit.peft import unit_table

    base_size = sum(p.numel() for p in target.unet.parameters())
    expected = _expected_count(name, target.unet)  # counted on the plain UNet, before the method changes it
    m = get_method(name, target.unet, granularity)
    rows = unit_table(m)
    assert [(r.index, r.name, r.parameters) for r in rows] == [(i, u.name, u.count) for i, u in enumerate(m.units())]
    assert sum(r.parameters for r in rows) == expected == m.trainable_count()
    assert all(r.percent_of_unet == pytest.approx(100 * r.parameters / base_size) for r in rows)


def test_list_units_loads_the_base_and_checks_its_arguments_first(tiny_dir_eps):
    from memaudit.peft import list_units

    rows = list_units(tiny_dir_eps, "difffit")
    fresh = load_target(tiny_dir_eps, device="cpu").unet
    assert sum(r.parameters for r in rows) == _expected_count("difffit", fresh)
    assert rows[0].name == "stem" and [r.index for r in rows] == list(range(len(rows)))
    with pytest.raises(ConfigError, match="unknown PEFT method 'dora'"):
        list_units("/no/such/model", "dora")
    with pytest.raises(ConfigError, match="--granularity 'row'"):
        list_units("/no/such/model", "difffit", "row")


def test_mask_accepts_bools_and_tensors(target):
    m = get_method("norm", target.unet)
    n = len(m.units())
    assert len(m.parameters_for([True] + [False] * (n - 1))) == len(m.units()[0].param_names)
    assert len(m.parameters_for(torch.ones(n, dtype=torch.long))) == len(m.trainable())


# -- adapters: save, load, merge, export ---------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("name", WRAPPING)
def test_save_then_load_onto_a_fresh_base_gives_identical_outputs(tmp_path, tiny_dir_eps, name, granularity):
    a = load_target(tiny_dir_eps, device="cpu")
    m = get_method(name, a.unet, granularity)
    _perturb(m)
    inputs = _inputs(a)
    adapted = _out(a.unet, inputs)
    mask = [1] * len(m.units())
    mask[0] = 0
    path = save_adapter(m, tmp_path / "adapter", base=str(tiny_dir_eps), mask=mask, learning_rate=3e-3, steps=5, seed=7,
                        extra={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["adapter.json", "adapter.safetensors"]
    info = read_adapter_info(path)
    assert info["kind"] == "memaudit.adapter" and info["schema_version"] == 1
    assert (info["method"], info["granularity"], info["mask"]) == (name, granularity, mask)
    assert (info["learning_rate"], info["steps"], info["seed"], info["note"]) == (3e-3, 5, 7, "test")
    assert info["units"] == [u.name for u in m.units()] and info["base"] == str(tiny_dir_eps)
    assert info["trainable_parameters"] == m.summary()["trainable_parameters"]
    assert set(info["versions"]) == {"torch", "diffusers", "memaudit"}

    b = load_target(tiny_dir_eps, device="cpu")
    assert not torch.equal(_out(b.unet, inputs), adapted)
    loaded = load_adapter(path, b.unet)
    assert (loaded.name, loaded.granularity) == (name, granularity)
    assert torch.equal(_out(b.unet, inputs), adapted)
    for n, p in loaded.trainable().items():
        assert torch.equal(p, m.trainable()[n])


def test_difffit_scales_survive_a_reload(tmp_path, tiny_dir_eps):
    a = load_target(tiny_dir_eps, device="cpu")
    m = get_method("difffit", a.unet)
    _perturb(m)
    scales = {n: p.detach().clone() for n, p in m.trainable().items() if n.endswith(".scale")}
    assert len(scales) == 3 * 7  # attn1, attn2 and ff of each of the 7 transformer blocks
    assert all(not torch.equal(s, torch.ones_like(s)) for s in scales.values())
    path = save_adapter(m, tmp_path / "a", base="tiny", mask=None, learning_rate=1e-3, steps=1, seed=0)
    loaded = load_adapter(path, load_target(tiny_dir_eps, device="cpu").unet)
    got = {n: p for n, p in loaded.trainable().items() if n.endswith(".scale")}
    assert set(got) == set(scales) and all(torch.equal(got[n], scales[n]) for n in scales)


@pytest.mark.parametrize("name", ALL)
def test_merge_gives_a_plain_unet_with_the_same_outputs_and_keys(target, name):
    from diffusers import UNet2DConditionModel

    keys = list(target.unet.state_dict())
    m = get_method(name, target.unet)
    _perturb(m, scale=0.02)
    inputs = _inputs(target)
    adapted = _out(target.unet, inputs)
    m.merge()
    assert type(target.unet) is UNet2DConditionModel
    assert list(target.unet.state_dict()) == keys
    assert all(type(mod).__module__.split(".")[0] in ("torch", "diffusers") for mod in target.unet.modules())
    assert "peft_config" not in target.unet.__dict__
    assert not any(p.requires_grad for p in target.unet.parameters())
    assert torch.allclose(_out(target.unet, inputs), adapted, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="merged"):
        m.trainable()


def test_masked_off_svdiff_layers_keep_their_exact_weights_after_merge(target):
    original = {k: v.clone() for k, v in target.unet.state_dict().items()}
    m = get_method("svdiff", target.unet)
    names = [u.name for u in m.units()]
    with torch.no_grad():
        for n in m.units()[names.index("mid_block.attentions.0")].param_names:
            m.trainable()[n].add_(0.1)
    m.merge()
    merged = target.unet.state_dict()
    changed = {k for k in original if not torch.equal(original[k], merged[k])}
    assert changed and all(k.startswith("mid_block.attentions.0.") for k in changed)


def test_export_merged_is_loadable_by_plain_diffusers(tmp_path, tiny_dir_eps):
    from diffusers import StableDiffusionPipeline

    a = load_target(tiny_dir_eps, device="cpu")
    m = get_method("svdiff", a.unet)
    _perturb(m, scale=0.02)
    inputs = _inputs(a)
    adapted = _out(a.unet, inputs)
    adapter = save_adapter(m, tmp_path / "adapter", base=str(tiny_dir_eps), mask=None, learning_rate=1e-3, steps=1,
                           seed=0)
    out = export_merged(adapter, tiny_dir_eps, tmp_path / "merged")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert torch.allclose(_out(pipe.unet, inputs), adapted, atol=1e-5, rtol=0)
    assert json.loads((out / "memaudit_adapter.json").read_text())["method"] == "svdiff"


# -- user errors ---------------------------------------------------------------------------------------------------
def test_unknown_method_lists_the_available_ones(target):
    with pytest.raises(ConfigError, match="unknown PEFT method 'ia3'.*difffit.*svdiff"):
        get_method("ia3", target.unet)


def test_bad_granularity_is_a_config_error(target):
    with pytest.raises(ConfigError, match="granularity 'module'"):
        get_method("svdiff", target.unet, "module")


def test_a_unet_carrying_a_method_refuses_a_second_one(target):
    get_method("lora", target.unet)
    with pytest.raises(ConfigError, match="already carries"):
        get_method("svdiff", target.unet)


def test_adapter_folder_without_adapter_json(tmp_path, target):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no adapter.json, so it is not an adapter folder; .*memaudit finetune"):
        load_adapter(tmp_path / "empty", target.unet)
    with pytest.raises(ConfigError, match="adapter folder .*missing does not exist"):
        read_adapter_info(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file is a file, not an adapter folder"):
        read_adapter_info(tmp_path / "file")
    (tmp_path / "ft" / "adapter").mkdir(parents=True)
    (tmp_path / "ft" / "adapter" / "adapter.json").write_text("{}")
    with pytest.raises(ConfigError, match="pass the adapter/ folder \\(.*ft/adapter is one\\)"):  # the fine-tune, not its adapter
        read_adapter_info(tmp_path / "ft")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_adapter(tmp_path / "bad", target.unet)


def test_adapter_that_does_not_fit_the_unet_is_refused_and_the_unet_restored(tmp_path, tiny_dir_eps, target):
    m = get_method("difffit", load_target(tiny_dir_eps, device="cpu").unet)
    _perturb(m)
    path = save_adapter(m, tmp_path / "a", base="tiny", mask=None, learning_rate=1e-3, steps=1, seed=0)
    meta = json.loads((path / "adapter.json").read_text())
    meta["units"][3] = "down_blocks.9.attentions.0"
    (path / "adapter.json").write_text(json.dumps(meta))
    keys = list(target.unet.state_dict())
    inputs = _inputs(target)
    before = _out(target.unet, inputs)
    with pytest.raises(ConfigError, match="does not fit this UNet"):
        load_adapter(path, target.unet)
    assert list(target.unet.state_dict()) == keys
    assert torch.equal(_out(target.unet, inputs), before)
    meta["method"] = "ia3"
    (path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unknown PEFT method 'ia3'"):
        load_adapter(path, target.unet)


def test_load_adapter_state_names_the_first_bad_key(target):
    m = get_method("svdiff", target.unet)
    state = m.adapter_state()
    first = next(iter(state))
    with pytest.raises(ConfigError, match=f"lacks {first}"):
        m.load_adapter_state({k: v for k, v in state.items() if k != first})
    with pytest.raises(ConfigError, match="unexpected tensor extra.delta"):
        m.load_adapter_state({**state, "extra.delta": torch.zeros(1)})
    with pytest.raises(ConfigError, match=f"{first} has shape \\(3,\\)"):
        m.load_adapter_state({**state, first: torch.zeros(3)})


def test_extra_metadata_cannot_override_recorded_fields(tmp_path, target):
    m = get_method("bias", target.unet)
    with pytest.raises(ConfigError, match="learning_rate"):
        save_adapter(m, tmp_path / "a", base="b", mask=None, learning_rate=1e-3, steps=1, seed=0,
                     extra={"learning_rate": 1.0})
