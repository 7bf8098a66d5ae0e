"""The PEFT methods on the denoiser of every model family (tiny pipelines of :mod:`memaudit.tiny_families`).

For each family and method: the trainable set matches a count made here by walking the plain denoiser's modules
(independently of the methods' own layer finders), the units partition it exactly at block and layer granularity,
block units on a DiT are one per transformer block (the family's own ``blocks()``) plus the ``stem``, the methods
that target layers find some in every block, a freshly installed method leaves the output exactly unchanged and
merges back to the exact base, a trained one merges to the same output with the original keys, and ``unload``
drops the adaptation, changing nothing but the base parameters the method trains directly.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch

from memaudit.peft import get_method
from memaudit.tiny_families import FAMILY_NAMES

METHODS = ["full", "svdiff", "difffit", "attention", "bias", "norm", "lora"]
DITS = ["sd3", "flux-dev", "flux-schnell", "pixart-sigma"]
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
# the joint (MMDiT) attention's context stream too: Flux and SD3
FLUX_LORA_LAYERS = LORA_LAYERS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@cache
def _base(family: str):
    """The tiny target of ``family`` and a pristine copy of its denoiser (never handed to a test)."""
    from memaudit.target import from_pipeline
    from memaudit.tiny_families import tiny_family

    target = from_pipeline(tiny_family(family), device="cpu")
    return target, copy.deepcopy(target.denoiser)


def _fresh(family: str):
    """The family's target with a fresh copy of the pristine denoiser installed (tests change it in place)."""
    target, pristine = _base(family)
    target.denoiser = copy.deepcopy(pristine)
    return target


@cache
def _inputs(family: str):
    target, _ = _base(family)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *target.latent_shape), generator=g)
    t = target.sample_timesteps(2, g)
    return x, t, target.encode_prompts(["a photo of a face", "a chest x-ray"])


@torch.no_grad()
def _out(target, family: str) -> torch.Tensor:
    x, t, cond = _inputs(family)
    return target.denoise(x, t, cond)


def _blocks(target, family: str) -> list[str]:
    """The transformer blocks, from the family (DiTs) or the UNet's Transformer2DModel modules."""
    from diffusers import Transformer2DModel

    if family in DITS:
        return target.family.blocks(target.denoiser)
    return [n for n, m in target.denoiser.named_modules() if n and isinstance(m, Transformer2DModel)]


def _norm_classes():
    from diffusers.models.normalization import RMSNorm

    return torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm, RMSNorm


def _attention_classes():
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return Attention, FluxAttention


def _in(name: str, blocks: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in blocks)


def _scaled_layers(denoiser, blocks: list[str]) -> list[str]:
    """DiffFit's scaled output projections, by name: attention outputs (image and context stream), feed-forward
    outputs, and the proj_out of Flux's single-stream blocks."""
    ends = ("attn.to_out.0", "attn1.to_out.0", "attn2.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2")
    out = [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and _in(n, blocks)
           and n.endswith(ends)]
    return out + [f"{b}.proj_out" for b in blocks if b.startswith("single_transformer_blocks.")]


def _lora_layers(denoiser, family: str) -> list[str]:
    ends = FLUX_LORA_LAYERS if family.startswith(("flux", "sd3")) else LORA_LAYERS
    return [n for n, m in denoiser.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(ends)]


def _expected_count(target, family: str, method: str) -> int:
    den = target.denoiser
    blocks = _blocks(target, family)
    mods = dict(den.named_modules())
    norms = [m for m in mods.values() if isinstance(m, _norm_classes())]
    norm_params = sum(p.numel() for m in norms for p in m.parameters(recurse=False))
    biases = sum(p.numel() for n, p in den.named_parameters() if n.endswith(".bias"))
    if method == "full":
        return sum(p.numel() for p in den.parameters())
    if method == "bias":
        return biases
    if method == "norm":
        return norm_params
    if method == "attention":
        return sum(p.numel() for n, m in mods.items() if isinstance(m, _attention_classes()) and _in(n, blocks)
                   for p in m.parameters())
    if method == "svdiff":
        layers = [m for m in mods.values() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        return (sum(min(m.weight.shape[0], m.weight[0].numel()) for m in layers)
                + sum(m.weight.numel() for m in norms if getattr(m, "weight", None) is not None))
    if method == "difffit":
        scales = sum(mods[n].out_features for n in _scaled_layers(den, blocks))
        norm_weights = sum(m.weight.numel() for m in norms if getattr(m, "weight", None) is not None)
        return biases + norm_weights + scales
    if method == "lora":
        return sum(4 * (mods[n].in_features + mods[n].out_features) for n in _lora_layers(den, family))
    raise AssertionError(method)


# -- the trainable set and its units ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_trainable_set_matches_a_hand_count_and_the_rest_is_frozen(family, method):
    target = _fresh(family)
    expected = _expected_count(target, family, method)
    m = get_method(method, target.denoiser)
    params = m.trainable()
    assert sum(p.numel() for p in params.values()) == expected
    if method not in ("norm",) or family not in ("sd3", "pixart-sigma"):
        assert expected > 0
    own = {id(p) for p in params.values()}
    assert all(p.requires_grad == (id(p) in own) for p in target.denoiser.parameters())
    assert m.summary()["trainable_parameters"] == expected


@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_units_partition_the_trainable_parameters(family, method, granularity):
    target = _fresh(family)
    m = get_method(method, target.denoiser, granularity)
    units, params = m.units(), m.trainable()
    names = [p for u in units for p in u.param_names]
    assert sorted(names) == sorted(params)  # nothing missing ...
    assert len(names) == len(set(names))  # ... and no overlap
    assert all(u.param_names and u.count == sum(params[p].numel() for p in u.param_names) for u in units)
    assert len({u.name for u in units}) == len(units)
    # every unit is a block (block granularity) or a layer that owns its parameters (layer granularity)
    blocks = _blocks(target, family)
    for u in units:
        if granularity == "layer":
            assert all(p.startswith(u.name + ".") or p == u.name for p in u.param_names), u.name
        elif u.name in blocks:
            assert all(p.startswith(u.name + ".") for p in u.param_names), u.name
        else:
            assert not any(_in(p, blocks) for p in u.param_names), u.name


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_block_units_are_one_per_transformer_block_plus_the_rest(family, method):
    target = _fresh(family)
    blocks = _blocks(target, family)
    units = [u.name for u in get_method(method, target.denoiser, "block").units()]
    if family in DITS:
        assert blocks == [n for n, c in target.denoiser.named_children() if isinstance(c, torch.nn.ModuleList)
                          for n in [f"{n}.{i}" for i in range(len(c))]]  # the family's blocks are the ModuleLists'
        if method in ("attention", "lora"):
            assert units == blocks
        elif method == "norm":  # only Flux has norm weights (its query/key RMSNorms, inside the attentions)
            assert units == (blocks if family.startswith("flux") else [])
        else:
            assert units == ["stem"] + blocks
    else:
        tops = [f"down_blocks.{i}" for i in range(len(target.denoiser.down_blocks))] + ["mid_block"] + [
            f"up_blocks.{i}" for i in range(len(target.denoiser.up_blocks))]
        layout = ["stem"]
        for top in tops:
            layout += [b for b in blocks if b.startswith(top + ".")] + [f"{top}.rest"]
        assert units == [u for u in layout if u in units]
        if method in ("attention", "lora"):
            assert units == [u for u in layout if u in blocks]  # data-flow order: the mid block before the up blocks
        else:
            assert set(blocks) <= set(units) and units[0] == "stem"


@pytest.mark.parametrize("method", ["svdiff", "difffit", "attention", "lora"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_methods_find_layers_in_every_block(family, method):
    target = _fresh(family)
    blocks = _blocks(target, family)
    pristine = _base(family)[1]
    m = get_method(method, target.denoiser, "layer")
    layers = [u.name for u in m.units()]
    for b in blocks:
        inside = [n for n in layers if n.startswith(b + ".")]
        assert inside, f"{method} found no layer in {b}"
    if method == "difffit":
        scaled = {n.rpartition(".")[0] for n in m.trainable() if n.endswith(".scale")}
        assert scaled == set(_scaled_layers(pristine, blocks)) and scaled
    if family.startswith("flux"):
        joint, single = "transformer_blocks.0", "single_transformer_blocks.0"
        wanted = {"svdiff": [f"{joint}.attn.norm_q", f"{joint}.attn.to_add_out", f"{single}.proj_out",
                             f"{single}.attn.norm_k"],
                  "difffit": [f"{joint}.attn.to_add_out", f"{joint}.ff_context.net.2", f"{single}.proj_out"],
                  "attention": [f"{joint}.attn.add_q_proj", f"{joint}.attn.norm_added_q", f"{single}.attn.to_q",
                                f"{single}.attn.norm_q"],
                  "lora": [f"{joint}.attn.add_k_proj", f"{joint}.attn.to_add_out", f"{single}.attn.to_v"]}[method]
        assert set(wanted) <= set(layers)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_targets_come_from_the_denoiser(family):
    from memaudit.peft.lora import lora_targets

    target = _fresh(family)
    expected = list(FLUX_LORA_LAYERS if family.startswith(("flux", "sd3")) else LORA_LAYERS)
    assert lora_targets(target.denoiser) == expected
    m = get_method("lora", target.denoiser, "layer")
    assert sorted(u.name for u in m.units()) == sorted(_lora_layers(_base(family)[1], family))


# -- installing, merging, unloading -------------------------------------------------------------------------------
def _plain_modules(denoiser) -> bool:
    return all(type(mod).__module__.split(".")[0] in ("torch", "diffusers") for mod in denoiser.modules())


def _perturb(method, seed: int = 1, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_an_untrained_method_is_the_base_and_merges_back_to_it_exactly(family, method):
    target = _fresh(family)
    base = {k: v.clone() for k, v in target.denoiser.state_dict().items()}
    reference = _out(target, family)
    m = get_method(method, target.denoiser)
    assert (_out(target, family) - reference).abs().max() <= 1e-6
    m.merge()
    state = target.denoiser.state_dict()
    assert list(state) == list(base)
    assert all(torch.equal(state[k], base[k]) for k in base)
    assert _plain_modules(target.denoiser) and "peft_config" not in target.denoiser.__dict__
    assert (_out(target, family) - reference).abs().max() <= 1e-6


@pytest.mark.parametrize("method", [m for m in METHODS if m != "norm"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_trained_method_merges_to_the_same_output_with_the_original_keys(family, method):
    target = _fresh(family)
    keys = list(target.denoiser.state_dict())
    reference = _out(target, family)
    m = get_method(method, target.denoiser)
    _perturb(m)
    adapted = _out(target, family)
    assert not torch.equal(adapted, reference)  # the perturbation reaches the output
    m.merge()
    assert list(target.denoiser.state_dict()) == keys and _plain_modules(target.denoiser)
    assert not any(p.requires_grad for p in target.denoiser.parameters())
    merged = _out(target, family)
    assert torch.allclose(merged, adapted, atol=1e-5 * max(1.0, float(adapted.abs().max())), rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unload_drops_the_adaptation_and_changes_only_the_base_parameters_it_trains(family, method):
    target = _fresh(family)
    den = target.denoiser
    base = {k: v.clone() for k, v in den.state_dict().items()}
    flags = [p.requires_grad for p in den.parameters()]
    m = get_method(method, den)
    trained_in_place = {id(p) for p in m.base_parameters()}
    _perturb(m)
    m.unload()
    assert list(den.state_dict()) == list(base) and _plain_modules(den) and "peft_config" not in den.__dict__
    assert [p.requires_grad for p in den.parameters()] == flags
    names = {id(p): n for n, p in den.named_parameters()}
    changed = {n for n, p in den.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {names[i] for i in trained_in_place}
    if method in ("svdiff", "lora"):  # they train only what they install: the base is untouched
        assert changed == set()
