"""What every family can do, end to end on its tiny pipeline: fine-tuning (full, SV-DIFF, LoRA) lowers the loss and
writes a folder plain diffusers loads; a LoRA adapter saved by diffusers changes the audit and equals plain
diffusers with the adapter; RWA and threshold inference-time mitigations run. (The mask search and its export are
in tests/mitigate/test_search_families.py; images and scores in tests/test_family_<name>.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memaudit.families import FAMILIES
from memaudit.target import from_pipeline, load_target
from memaudit.tiny_families import FAMILY_NAMES, RESOLUTION, call_kwargs, tiny_family

pytestmark = pytest.mark.slow  # every family end to end: CI runs it; `pytest -m 'not slow'` leaves it out

STEPS = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every tiny family saved once (safetensors), by name."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILY_NAMES:
        tiny_family(name).save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def dataset():
    """Four seeded random 32-px RGB images with distinct captions (the tiny families' resolution)."""
    from memaudit.data import from_arrays

    images = np.random.default_rng(0).random((4, RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    return from_arrays(images, [f"a photo of item {i}" for i in range(4)])


def _fixed_loss(target, dataset, seed: int = 0) -> float:
    """The training loss of the denoiser at fixed latents, noise and timesteps (no dropout), without gradient."""
    with torch.no_grad():
        x0 = target.encode_images(dataset.read(list(range(len(dataset)))))[0]
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x0.shape, generator=g)
        t = target.sample_timesteps(len(x0), g)
        out = target.denoise(target.add_noise(x0, noise, t), t, target.encode_prompts(list(dataset.captions)))
        return float((out.float() - target.training_target(x0, noise, t)).pow(2).mean())


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("method", ["full", "svdiff", "lora"])
def test_finetune_lowers_the_loss_and_loads_in_diffusers(name, method, folders, dataset, tmp_path):
    from diffusers import DiffusionPipeline

    from memaudit.finetune import FinetuneConfig, finetune

    lr = {"full": 1e-3, "svdiff": 1e-2, "lora": 1e-2}[method]
    out = tmp_path / "tuned"
    finetune(folders[name], dataset, out, FinetuneConfig(method=method, steps=12, batch_size=4, learning_rate=lr,
                                                         caption_dropout=0.0, checkpoint_every=100),
             device="cpu", cache_dir=tmp_path / "cache")
    before = _fixed_loss(load_target(folders[name], device="cpu"), dataset)
    after = _fixed_loss(load_target(out, device="cpu"), dataset)
    assert after < before, (before, after)
    plain = DiffusionPipeline.from_pretrained(out)  # plain diffusers, no memaudit
    assert type(plain).__name__ in FAMILIES[load_target(out, device="cpu").family.name].pipeline_classes
    image = plain("a photo of item 1", num_inference_steps=STEPS, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **call_kwargs(plain)).images
    assert image.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(image).all()


def _lora_layers(denoiser, seed: int = 1):
    """A random rank-4 LoRA (B non-zero) on the denoiser's attention projections, as peft state for diffusers."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]  # peft adapts the modules with these name suffixes that exist
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), denoiser,
                            adapter_name="made")
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if ".lora_" in n:
                p.mul_(0.3)
    return get_peft_model_state_dict(denoiser, adapter_name="made")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lora_saved_by_diffusers_changes_the_audit(name, folders, tmp_path):
    """A LoRA saved by diffusers' own ``save_lora_weights`` (PixArt, whose pipelines have no LoRA loader in
    diffusers: a peft adapter folder) changes the audited images, which equal plain diffusers' with the adapter."""
    from diffusers import DiffusionPipeline
    from peft import PeftModel
    from safetensors.torch import save_file

    from memaudit.sampling import Sampler

    maker = DiffusionPipeline.from_pretrained(folders[name])
    kind = "unet" if getattr(maker, "unet", None) is not None else "transformer"
    layers = _lora_layers(getattr(maker, kind))
    diffusers_format = hasattr(type(maker), "save_lora_weights")
    if diffusers_format:
        type(maker).save_lora_weights(tmp_path / "lora", **{f"{kind}_lora_layers": layers}, safe_serialization=True)
    else:
        getattr(maker, kind).peft_config["made"].save_pretrained(tmp_path / "lora")
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in layers.items()},
                  tmp_path / "lora" / "adapter_model.safetensors")

    def images(target):
        return next(iter(Sampler(target, steps=STEPS, guidance=4.0, batch_size=2, seed=0).run(["a photo"], 2)))

    base = images(load_target(folders[name], device="cpu"))
    tuned = images(load_target(folders[name], device="cpu", loras=[(tmp_path / "lora", 1.0)]))
    assert (base.images - tuned.images).abs().max() > 1e-4
    plain = DiffusionPipeline.from_pretrained(folders[name])
    if diffusers_format:
        plain.load_lora_weights(str(tmp_path / "lora"))
    else:
        setattr(plain, kind, PeftModel.from_pretrained(getattr(plain, kind), str(tmp_path / "lora")).merge_and_unload())
    ref = plain(["a photo"] * 2, num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in tuned.seeds], **call_kwargs(plain)).images
    assert (ref - tuned.images).abs().max() <= 1e-4


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_inference_time_mitigations_run(name, dataset, tmp_path):
    from memaudit.audit import AuditConfig, run_audit

    target = from_pipeline(tiny_family(name), device="cpu")
    prompts, reference = ["a photo of item 1", "a photo of item 2"], ["a painting", "a drawing"]
    plain = run_audit(target, dataset, tmp_path / "none", prompts=prompts, reference_prompts=reference,
                      config=AuditConfig(generations=2, min_clique=2, steps=STEPS, device="cpu"))
    for kind in ("rwa", "threshold"):
        # a tiny norm target, so the threshold mitigation must optimize every batch
        res = run_audit(target, dataset, tmp_path / kind, prompts=prompts, reference_prompts=reference,
                        config=AuditConfig(generations=2, min_clique=2, steps=STEPS, device="cpu", mitigation=kind,
                                           mitigation_target=1e-6, mitigation_steps=2))
        assert res["summary"]["mitigation"]["kind"] == kind
        # the mitigation changed what was sampled
        assert res["prompts"] != plain["prompts"] or res["images"] != plain["images"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_training_time_mitigations_run(name, folders, dataset, tmp_path):
    from memaudit.finetune import FinetuneConfig, finetune

    for kind in ("rwa", "threshold"):
        settings = finetune(folders[name], dataset, tmp_path / kind,
                            FinetuneConfig(method="bias", steps=3, batch_size=4, mitigation=kind, rwa_probability=1.0,
                                           checkpoint_every=100), device="cpu", cache_dir=tmp_path / "cache")
        stats = settings["result"]["stats"]
        if kind == "threshold":
            assert stats["threshold_seen"] == 12 and 0 < stats["threshold_dropped"] < 12  # auto: the top decile
        assert settings["settings"]["mitigation"] == kind


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_token_attribution_reads_the_tokens_the_encoder_gets(name):
    from memaudit.attacks.denoising import token_attribution

    target = from_pipeline(tiny_family(name), device="cpu")
    prompt = "A Photo of a CAT"
    fed = []
    handle = target.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs.get("input_ids", args[0] if args else None)), with_kwargs=True)
    try:
        target.embed([prompt])
    finally:
        handle.remove()
    # what Target.tokenize gives is what the family's encoding fed to the first text encoder (PixArt: lower-cased,
    # at its T5 length; the CLIP encoders: at 77)
    assert torch.equal(target.tokenize([prompt])["input_ids"], fed[0])
    shares = token_attribution(target, prompt)
    assert [t for t, _ in shares] == ["a", "photo", "of", "a", "cat"]
    assert all(s > 0 for _, s in shares) and sum(s for _, s in shares) == pytest.approx(1.0)
