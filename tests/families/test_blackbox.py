"""A text-to-image pipeline of no known family is audited as a black box: extraction and AMD from its images, no
denoising strength, and a line saying why."""

from __future__ import annotations

import json

import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline, load_target


def _lcm(seed: int = 0):
    """A latent consistency model pipeline (not a memaudit family) from the tiny SD's components."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    from memaudit.testing import tiny_pipeline

    sd = tiny_pipeline(seed=seed)
    torch.manual_seed(seed)
    config = {k: v for k, v in sd.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})  # LCM's guidance embedding
    return LatentConsistencyModelPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                          unet=unet, scheduler=LCMScheduler.from_config(sd.scheduler.config),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lcm") / "lcm"
    _lcm().save_pretrained(folder, safe_serialization=True)
    return folder


def test_black_box_images_equal_plain_diffusers(lcm_dir):
    target = load_target(lcm_dir, device="cpu")
    assert target.family.black_box and target.resolution == 16 and target.image_channels == 3
    batch = next(iter(Sampler(target, steps=2, guidance=4.0, batch_size=4, seed=0).run(["a photo of item 1",
                                                                                        "a photo of item 2"], 2)))
    assert torch.isnan(batch.guidance_norms).all() and batch.guidance_norms.shape == (4, 2)
    plain = target.pipe(["a photo of item 1"] * 2 + ["a photo of item 2"] * 2, num_inference_steps=2,
                        guidance_scale=4.0, output_type="pt",
                        generator=[torch.Generator().manual_seed(s) for s in batch.seeds]).images
    assert (plain - batch.images).abs().max() <= 1e-6
    assert (batch.images[0] - batch.images[2]).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="no guidance norms"):
        Sampler(target, steps=2).first_step_norms(["a"], 1)


def test_black_box_audit_says_why_no_denoising(lcm_dir, data_dir, tmp_path):
    from memaudit.audit import AuditConfig, run_audit

    out = tmp_path / "audit"
    results = run_audit(lcm_dir, data_dir, out, prompts=["a photo of item 1", "a photo of item 2"],
                        reference_prompts=["a painting", "a drawing"],
                        config=AuditConfig(generations=2, min_clique=2, steps=2, device="cpu"))
    assert results["family"] == "blackbox"
    s = results["summary"]
    assert "black box" in s["denoising_note"] and s["detection"] is None and s["denoising_threshold"] is None
    assert s["amd"] > 0 and len(results["images"]) == 4
    assert "black box" in (out / "report.html").read_text()
    json.loads((out / "results.json").read_text())  # valid JSON, NaN scores included
    with pytest.raises(ConfigError, match="threshold"):
        run_audit(lcm_dir, data_dir, tmp_path / "t", prompts=["a"], reference_prompts=["b"],
                  config=AuditConfig(generations=2, min_clique=2, steps=2, device="cpu", mitigation="threshold"))
    assert not (tmp_path / "t").exists()


def test_unsupported_in_memory_pipeline_names_what_is_supported():
    from diffusers import StableDiffusionImg2ImgPipeline

    from memaudit.core.errors import TargetError
    from memaudit.testing import tiny_pipeline

    sd = tiny_pipeline()
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    with pytest.raises(TargetError, match="not a text-to-image pipeline.*StableDiffusionPipeline"):
        from_pipeline(img2img, device="cpu")
