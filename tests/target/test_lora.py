"""LoRA adapters on a base model: ``--lora PATH`` as diffusers' ``load_lora_weights`` reads it."""

from __future__ import annotations

import json

import pytest
import torch

from memaudit.core.errors import ConfigError, TargetError
from memaudit.sampling import Sampler
from memaudit.target import file_sha256, load_target


def _save_adapter(pipe, folder, seed: int = 1, scale: float = 0.5):
    """A random rank-4 LoRA on the UNet's attention projections (B non-zero, so it changes the model), saved with
    diffusers' own ``save_lora_weights``."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    unet = pipe.unet
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False), unet, adapter_name="made")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.mul_(scale)
    layers = get_peft_model_state_dict(unet, adapter_name="made")
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_dir_eps):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir_eps)
    return _save_adapter(pipe, tmp_path_factory.mktemp("lora") / "adapter")


def _images(target, prompts=("a photo of item 1", "a photo of item 2")):
    batch = next(iter(Sampler(target, steps=3, guidance=4.0, batch_size=4, seed=0).run(list(prompts), 2)))
    return batch


def test_lora_changes_the_model_and_equals_plain_diffusers(tiny_dir_eps, adapter):
    from diffusers import StableDiffusionPipeline

    base = load_target(tiny_dir_eps, device="cpu")
    tuned = load_target(tiny_dir_eps, device="cpu", loras=[(adapter, 1.0)])
    b0, b1 = _images(base), _images(tuned)
    assert (b0.images - b1.images).abs().max() > 1e-3  # the adapter changes what the audit sees

    plain = StableDiffusionPipeline.from_pretrained(tiny_dir_eps, safety_checker=None, requires_safety_checker=False)
    plain.load_lora_weights(str(adapter))
    prompts = ["a photo of item 1"] * 2 + ["a photo of item 2"] * 2
    ref = plain(prompts, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in b1.seeds]).images
    assert (ref - b1.images).abs().max() <= 1e-5

    weights = adapter / "pytorch_lora_weights.safetensors"
    assert tuned.loras == [{"path": str(adapter.resolve()), "file": str(weights.resolve()),
                            "sha256": file_sha256(weights), "scale": 1.0, "keys": 112, "modules_named": 56,
                            "modules_matched": 56, "partial": False}]
    assert not any(".lora_" in n for n, _ in tuned.unet.named_parameters())  # fused: plain weights


def test_lora_scale_zero_is_the_base(tiny_dir_eps, adapter):
    base = load_target(tiny_dir_eps, device="cpu")
    off = load_target(tiny_dir_eps, device="cpu", loras=[(adapter / "pytorch_lora_weights.safetensors", 0.0)])
    assert torch.equal(_images(base).images, _images(off).images)


def test_lora_errors_are_one_line(tiny_dir_eps, tmp_path):
    pickled = tmp_path / "adapter.bin"
    pickled.write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    for path, words in [(tmp_path / "missing", "does not exist"), (pickled, "never unpickles"),
                        (empty, "no .safetensors"), (junk, "not a readable safetensors file")]:
        with pytest.raises(TargetError) as info:
            load_target(tiny_dir_eps, device="cpu", loras=[(path, 1.0)])
        assert words in str(info.value) and "\n" not in str(info.value)


def test_audit_cli_records_the_adapter(tiny_dir_eps, adapter, data_dir, tmp_path):
    from typer.testing import CliRunner

    from memaudit.cli import app

    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", str(tiny_dir_eps), "--train", str(data_dir), "--out", str(out),
                                      "--lora", str(adapter), "--lora-scale", "0.5", "--generations", "2",
                                      "--min-clique", "2", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["family"] == "sd"
    weights = adapter / "pytorch_lora_weights.safetensors"
    assert doc["adapters"] == [{"path": str(adapter.resolve()), "file": str(weights.resolve()),
                                "sha256": file_sha256(weights), "scale": 0.5, "keys": 112, "modules_named": 56,
                                "modules_matched": 56, "partial": False}]
    bad = CliRunner().invoke(app, ["audit", str(tiny_dir_eps), "--train", str(data_dir), "--out", str(tmp_path / "x"),
                                   "--lora", str(adapter), "--lora-scale", "0.5", "--lora-scale", "1"])
    # main() turns this into one line and exit 2 (tests/cli/test_cli.py checks that for every MemauditError)
    assert isinstance(bad.exception, ConfigError) and "--lora-scale" in str(bad.exception)
    assert not (tmp_path / "x").exists()


def test_finetune_lora_writes_a_diffusers_lora(tiny_dir_eps, tiny_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline

    from memaudit.finetune import LORA_DIR, FinetuneConfig, finetune

    out = tmp_path / "tuned"
    settings = finetune(tiny_dir_eps, tiny_dataset, out, FinetuneConfig(method="lora", steps=3, batch_size=2,
                                                                        learning_rate=1e-2),
                        device="cpu", cache_dir=tmp_path / "cache")
    assert settings["diffusers_lora"] == LORA_DIR and (out / LORA_DIR / "pytorch_lora_weights.safetensors").is_file()
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="pt")
    merged = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    plain = StableDiffusionPipeline.from_pretrained(tiny_dir_eps, safety_checker=None, requires_safety_checker=False)
    base_images = plain("a photo of item 1", generator=torch.Generator().manual_seed(0), **kw).images
    plain.load_lora_weights(str(out / LORA_DIR))  # plain diffusers, no memaudit
    with_lora = plain("a photo of item 1", generator=torch.Generator().manual_seed(0), **kw).images
    tuned = merged("a photo of item 1", generator=torch.Generator().manual_seed(0), **kw).images
    assert (with_lora - base_images).abs().max() > 1e-4  # the adapter trained
    assert (with_lora - tuned).abs().max() <= 1e-5
