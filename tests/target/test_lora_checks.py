"""An adapter is what it claims (issue 20): ``--lora`` refuses adapters that match nothing, change nothing, come in a
folder of several files, have a non-finite scale or belong to another architecture, each in one line and without
diffusers' own output; a partial match is applied and recorded with its counts; the hash is the loaded file's."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from memaudit.core.errors import TargetError
from memaudit.target import file_sha256, load_target, lora_module_name


def _adapter(pipe_dir, folder, *, text_encoder: bool = False, trained: bool = True, seed: int = 1):
    """A rank-4 LoRA on the UNet's attention projections (and the text encoder's, when asked), saved with diffusers'
    ``save_lora_weights``; ``trained=False`` leaves B at peft's zero initialisation (an adapter that adds nothing)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    torch.manual_seed(seed)
    layers = {}
    parts = [("unet", pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"])]
    if text_encoder:
        parts.append(("text_encoder", pipe.text_encoder, ["q_proj", "v_proj"]))
    for kind, module, targets in parts:
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=not trained),
                                module, adapter_name="made")
        layers[f"{kind}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="made")
    type(pipe).save_lora_weights(folder, **layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir_eps):
    return _adapter(tiny_dir_eps, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def tensors(adapter):
    return load_file(adapter / "pytorch_lora_weights.safetensors")


def _write(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "pytorch_lora_weights.safetensors")
    return folder


def _one_line_refusal(model, lora, scale=1.0) -> str:
    with pytest.raises(TargetError) as info:
        load_target(model, device="cpu", loras=[(lora, scale)])
    text = str(info.value)
    assert "\n" not in text
    return text


def test_adapter_matching_nothing_is_refused(tiny_dir_eps, tensors, tmp_path):
    n = len(tensors)
    assert n == 112  # 56 attention projections of the tiny UNet, A and B each
    # module names that do not exist (peft finds no module) and a component prefix no pipeline has (diffusers skips)
    wrong_modules = _write(tmp_path / "modules", {k.replace("unet.", "unet.nothere_"): v for k, v in tensors.items()})
    wrong_prefix = _write(tmp_path / "prefix", {k.replace("unet.", "denoiser."): v for k, v in tensors.items()})
    for lora in (wrong_modules, wrong_prefix):
        text = _one_line_refusal(tiny_dir_eps, lora)
        assert f"none of the {n} keys of pytorch_lora_weights.safetensors matched a module" in text, text
        assert str(lora) in text


def test_adapter_changing_nothing_is_refused_but_scale_zero_is_the_base(tiny_dir_eps, tmp_path, adapter):
    untrained = _adapter(tiny_dir_eps, tmp_path / "untrained", trained=False)
    assert "changes no weight" in _one_line_refusal(tiny_dir_eps, untrained)
    base = load_target(tiny_dir_eps, device="cpu")
    off = load_target(tiny_dir_eps, device="cpu", loras=[(adapter, 0.0)])  # the user asked for nothing: allowed
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), off.unet.state_dict().values()))


def test_partial_match_is_applied_and_counted(tiny_dir_eps, tensors, tmp_path, caplog):
    # the to_q projections of the down blocks renamed: 4 of the 56 modules the keys name do not exist
    renamed = {(k.replace(".to_q.", ".to_qq.") if k.startswith("unet.down_blocks") else k): v
               for k, v in tensors.items()}
    lora = _write(tmp_path / "partial", renamed)
    base = load_target(tiny_dir_eps, device="cpu")
    with caplog.at_level(logging.WARNING, logger="memaudit"):
        target = load_target(tiny_dir_eps, device="cpu", loras=[(lora, 1.0)])
    record = target.loras[0]
    counts = (record["keys"], record["modules_named"], record["modules_matched"], record["partial"])
    assert counts == (112, 56, 52, True)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("matched only 52 of the 56 modules its 112 keys name" in m for m in warned), warned
    # the matched modules were applied: the up blocks' to_q changed, the down blocks' did not
    weights, plain = dict(target.unet.named_parameters()), dict(base.unet.named_parameters())
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    up = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(weights[down], plain[down]) and not torch.equal(weights[up], plain[up])


def test_full_match_counts_every_component(tiny_dir_eps, tmp_path):
    lora = _adapter(tiny_dir_eps, tmp_path / "both", text_encoder=True)
    record = load_target(tiny_dir_eps, device="cpu", loras=[(lora, 1.0)]).loras[0]
    # 56 UNet projections + q and v of the 2 text encoder layers
    counts = (record["keys"], record["modules_named"], record["modules_matched"], record["partial"])
    assert counts == (120, 60, 60, False)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), "half"])
def test_scale_must_be_finite(tiny_dir_eps, adapter, scale):
    text = _one_line_refusal(tiny_dir_eps, adapter, scale)
    assert text.startswith("--lora-scale ") and ("finite" in text or "not a number" in text)


def test_folder_of_several_adapters_is_refused_and_the_loaded_file_is_hashed(tiny_dir_eps, adapter, tensors, tmp_path):
    two = _write(tmp_path / "two", tensors)
    save_file({k: v * 2 for k, v in tensors.items()}, two / "stronger.safetensors")
    text = _one_line_refusal(tiny_dir_eps, two)
    assert "2 adapter files (pytorch_lora_weights.safetensors, stronger.safetensors)" in text, text
    assert f"--lora {two / 'pytorch_lora_weights.safetensors'}" in text
    # the file itself is accepted, and what is recorded is that file and its hash (not the folder's)
    target = load_target(tiny_dir_eps, device="cpu", loras=[(two / "stronger.safetensors", 1.0)])
    record = target.loras[0]
    assert record["file"] == str((two / "stronger.safetensors").resolve())
    assert record["sha256"] == file_sha256(two / "stronger.safetensors") != file_sha256(two)
    # a folder with one adapter file: that file is the one hashed, whatever else the folder holds
    (adapter / "README.md").write_text("notes beside the adapter\n")
    record = load_target(tiny_dir_eps, device="cpu", loras=[(adapter, 1.0)]).loras[0]
    assert record["path"] == str(adapter.resolve())
    assert record["sha256"] == file_sha256(adapter / "pytorch_lora_weights.safetensors")


def test_adapter_of_another_architecture_is_one_quiet_line(tiny_dir_eps, tmp_path, capfd, caplog):
    from memaudit.models import ModelSpec, build_pipeline
    from memaudit.testing import tiny_pipeline

    wide_dir = tmp_path / "wide"
    tokenizer = tiny_pipeline(resolution=16).tokenizer
    wide_pipe = build_pipeline(ModelSpec(resolution=16, max_length=16, unet_channels=(16, 32)), tokenizer=tokenizer)
    wide_pipe.save_pretrained(wide_dir, safe_serialization=True)
    wide = _adapter(wide_dir, tmp_path / "wide-lora")
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG):
        text = _one_line_refusal(tiny_dir_eps, wide)
    assert ("first mismatching key, down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight of the "
            "UNet2DConditionModel, has shape (4, 16) where the model has (4, 8)") in text, text
    out, err = capfd.readouterr()
    assert "size mismatch" not in out + err and len((out + err).splitlines()) <= 2, (out + err)[:2000]
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage()[:200] for r in loud]
    # what diffusers said is kept at debug level, one line per message
    assert any("size mismatch" in r.getMessage() or "unsuccessful" in r.getMessage() for r in caplog.records
               if r.name == "memaudit.target" and r.levelno == logging.DEBUG)


def test_lora_module_names_of_common_formats():
    assert lora_module_name("unet.down_blocks.0.attn1.to_q.lora_A.weight") == "unet.down_blocks.0.attn1.to_q"
    assert lora_module_name("transformer.x.to_k.lora_B.default.weight") == "transformer.x.to_k"
    assert lora_module_name("lora_unet_down_blocks_0_proj_in.lora_down.weight") == "lora_unet_down_blocks_0_proj_in"
    assert lora_module_name("lora_unet_down_blocks_0_proj_in.alpha") == "lora_unet_down_blocks_0_proj_in"
    assert lora_module_name("unet.a.processor.to_q_lora.down.weight") == "unet.a.processor.to_q_lora"
    assert lora_module_name("text_encoder.layers.0.q_proj.lora.up.weight") == "text_encoder.layers.0.q_proj"
    assert lora_module_name("lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale") == \
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    from memaudit.tiny_families import FAMILY_NAMES, tiny_family

    root = tmp_path_factory.mktemp("families")
    for name in FAMILY_NAMES:
        tiny_family(name).save_pretrained(root / name, safe_serialization=True)
    return {name: root / name for name in FAMILY_NAMES}


def test_every_family_records_a_full_match(family_folders, tmp_path):
    """Each family's loader (diffusers' own, or the peft folder for PixArt) counts the modules it matched: a complete
    adapter is complete, one with a renamed module is partial, one naming no module is refused."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    for name, folder in family_folders.items():
        maker = DiffusionPipeline.from_pretrained(folder)
        kind = "unet" if getattr(maker, "unet", None) is not None else "transformer"
        torch.manual_seed(0)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                           init_lora_weights=False), getattr(maker, kind), adapter_name="made")
        layers = get_peft_model_state_dict(getattr(maker, kind), adapter_name="made")
        n_modules = len({k.rpartition(".lora_")[0] for k in layers})
        full, part, none = (tmp_path / name / kind_ for kind_ in ("full", "part", "none"))
        first = sorted({k.rpartition(".lora_")[0] for k in layers})[0]
        renamed = {(k.replace(first + ".", first + "x.") if k.startswith(first + ".") else k): v
                   for k, v in layers.items()}
        nowhere = {f"nothere_{k}": v for k, v in layers.items()}
        if hasattr(type(maker), "save_lora_weights"):
            for where, state in ((full, layers), (part, renamed), (none, nowhere)):
                type(maker).save_lora_weights(where, **{f"{kind}_lora_layers": state}, safe_serialization=True)
        else:  # PixArt: a peft adapter folder
            for where, state in ((full, layers), (part, renamed), (none, nowhere)):
                getattr(maker, kind).peft_config["made"].save_pretrained(where)
                save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
                          where / "adapter_model.safetensors")
        got = load_target(folder, device="cpu", loras=[(full, 1.0)]).loras[0]
        assert (got["modules_named"], got["modules_matched"], got["partial"]) == (n_modules, n_modules, False), name
        got = load_target(folder, device="cpu", loras=[(part, 1.0)]).loras[0]
        assert (got["modules_named"], got["modules_matched"], got["partial"]) == (n_modules, n_modules - 1, True), name
        with pytest.raises(TargetError, match=f"none of the {len(layers)} keys of .* matched a module"):
            load_target(folder, device="cpu", loras=[(none, 1.0)])


def test_report_names_a_partial_adapter_and_the_cli_refuses_a_nan_scale(tmp_path):
    from typer.testing import CliRunner

    from memaudit.cli import app
    from memaudit.report import adapter_line

    line = adapter_line({"path": "/x/a.safetensors", "file": "/x/a.safetensors", "scale": 0.5, "sha256": "ab" * 32,
                         "keys": 40, "modules_named": 20, "modules_matched": 15, "partial": True})
    assert line.startswith("/x/a.safetensors at scale 0.5") and "matched 15 of the 20 modules its 40 keys name" in line
    assert "PARTIAL" not in adapter_line({"path": "a", "scale": 1.0, "sha256": "cd" * 32, "partial": False})
    res = CliRunner().invoke(app, ["audit", str(tmp_path), "--train", str(tmp_path), "--out", str(tmp_path / "o"),
                                   "--lora", str(tmp_path / "a.safetensors"), "--lora-scale", "nan"])
    assert res.exit_code != 0 and "--lora-scale nan is not a finite number" in str(res.exception or res.output)
    assert not (tmp_path / "o").exists()
