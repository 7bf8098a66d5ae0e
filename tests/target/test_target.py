"""Tests for memaudit.target: loading SD-family pipelines, prompt embeddings, eps-space prediction, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from memaudit.core.errors import TargetError
from memaudit.families import Conditioning
from memaudit.target import load_target, output_to_eps, training_target

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _inputs(target, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *target.latent_shape, generator=g)
    t = torch.tensor([10, 500, 900, 250][:n])
    return x, t


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _target_error(match, fn, *args, **kwargs) -> str:
    with pytest.raises(TargetError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert any(m in msg for m in ([match] if isinstance(match, str) else match)), msg
    return msg


@pytest.fixture(scope="module")
def target_eps(tiny_dir_eps):
    return load_target(tiny_dir_eps, device="cpu")


@pytest.fixture(scope="module")
def target_v(tiny_dir_v):
    return load_target(tiny_dir_v, device="cpu")


# -- loading and facts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, prediction_type, scheduler",
                         [("eps", "epsilon", "DDIMScheduler"), ("v", "v_prediction", "DPMSolverMultistepScheduler")])
def test_load_target_facts(which, prediction_type, scheduler, target_eps, target_v, tiny_dir_eps, tiny_dir_v):
    target = target_eps if which == "eps" else target_v
    assert target.device == torch.device("cpu")
    assert target.dtype == torch.float32
    assert target.path == str(tiny_dir_eps if which == "eps" else tiny_dir_v)
    assert target.prediction_type == prediction_type
    assert type(target.scheduler).__name__ == scheduler
    assert target.resolution == 16
    assert target.image_channels == 3
    assert target.vae_scale_factor == 2
    assert target.latent_shape == (4, 8, 8)
    assert target.num_train_timesteps == 1000
    # frozen and in eval mode after loading
    assert not target.unet.training
    assert all(not p.requires_grad for p in target.unet.parameters())


@pytest.mark.parametrize("which", ["eps", "v"])
def test_encode_prompts_matches_diffusers_and_caches(which, target_eps, target_v, tiny_dir_eps, tiny_dir_v):
    from diffusers import StableDiffusionPipeline

    target = target_eps if which == "eps" else target_v
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir_eps if which == "eps" else tiny_dir_v)
    target.clear_prompt_cache()
    prompts = ["a photo of a cat", "", "a photo of a cat", "a red car"]
    emb = target.encode_prompts(prompts).embeds
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    assert emb.shape == ref.shape == (4, 16, 8)
    assert torch.allclose(emb, ref, atol=1e-6)
    assert torch.equal(emb[0], emb[2])
    assert not torch.allclose(emb[0], emb[3])
    # each distinct prompt is encoded and stored once
    assert sorted(target._prompt_cache) == sorted(["a photo of a cat", "", "a red car"])
    again = target.encode_prompts(prompts).embeds
    assert torch.equal(again, emb)
    assert len(target._prompt_cache) == 3
    # the cache is what is returned: poisoning it shows the second call does not re-encode
    target._prompt_cache["a red car"] = Conditioning({"prompt_embeds": torch.zeros_like(emb[3:4])})
    assert torch.equal(target.encode_prompts(["a red car"]).embeds[0], torch.zeros_like(emb[3]))
    target.clear_prompt_cache()
    assert torch.equal(target.encode_prompts(["a red car"]).embeds[0], emb[3])
    assert torch.equal(target.unconditional(3).embeds, emb[1:2].expand(3, -1, -1))


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_on_cpu(dtype, torch_dtype, tiny_dir_eps, target_eps):
    half = load_target(tiny_dir_eps, device="cpu", dtype=dtype)
    assert half.dtype == torch_dtype
    assert next(half.unet.parameters()).dtype == torch_dtype
    x, t = _inputs(target_eps, 2)
    with torch.no_grad():
        ref = target_eps.predict_eps(x, t, target_eps.encode_prompts(["a cat", "a dog"]))
        got = half.predict_eps(x, t, half.encode_prompts(["a cat", "a dog"]))
    assert got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 0.05


# -- prediction types ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type, expected", [("epsilon", 0.5), ("v_prediction", 1.0), ("sample", 1.0)])
def test_output_to_eps_hand_computed(prediction_type, expected):
    a = torch.tensor([0.64])  # sqrt(a) = 0.8, sqrt(1 - a) = 0.6
    x_t = torch.ones(1, 1, 2, 2)
    out = torch.full((1, 1, 2, 2), 0.5)
    eps = output_to_eps(out, x_t, a, prediction_type)
    assert eps.dtype == torch.float32
    assert torch.allclose(eps, torch.full_like(x_t, expected), atol=1e-6)


def test_output_to_eps_per_sample_alpha():
    # two batch elements with different alpha_bar: each uses its own
    a = torch.tensor([0.64, 0.36])  # sqrt: 0.8/0.6 and 0.6/0.8
    x_t = torch.ones(2, 3)
    out = torch.full((2, 3), 0.5)
    v = output_to_eps(out, x_t, a, "v_prediction")
    assert torch.allclose(v, torch.tensor([[1.0] * 3, [0.6 * 0.5 + 0.8 * 1.0] * 3]))
    s = output_to_eps(out, x_t, a, "sample")
    assert torch.allclose(s, torch.tensor([[1.0] * 3, [(1.0 - 0.6 * 0.5) / 0.8] * 3]))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_round_trip(prediction_type):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 4, 3, 3, generator=g)
    eps = torch.randn(5, 4, 3, 3, generator=g)
    a = torch.tensor([0.999, 0.9, 0.5, 0.1, 0.01])
    ar = a.reshape(-1, 1, 1, 1)
    x_t = ar.sqrt() * x0 + (1 - ar).sqrt() * eps
    goal = training_target(x0, eps, a, prediction_type)
    back = output_to_eps(goal, x_t, a, prediction_type)
    assert torch.allclose(back, eps, atol=1e-4)


def test_unknown_prediction_type():
    x = torch.zeros(1, 2)
    _target_error("prediction_type", output_to_eps, x, x, torch.tensor([0.5]), "flow")
    _target_error("prediction_type", training_target, x, x, torch.tensor([0.5]), "flow")


def test_predict_eps_v_model_matches_manual_formula(target_v):
    x, t = _inputs(target_v, 3)
    emb = target_v.encode_prompts(["a", "b", "c"]).embeds
    with torch.no_grad():
        v = target_v.unet(x, t, encoder_hidden_states=emb).sample
        got = target_v.predict_eps(x, t, emb)
    a = target_v.scheduler.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    manual = a.sqrt() * v + (1 - a).sqrt() * x
    assert torch.allclose(got, manual, atol=1e-5)
    assert not torch.allclose(got, v, atol=1e-3)  # the conversion did something
    # a single scalar timestep is broadcast to the batch
    with torch.no_grad():
        one = target_v.predict_eps(x, torch.tensor(500), emb)
        full = target_v.predict_eps(x, torch.tensor([500, 500, 500]), emb)
    assert torch.allclose(one, full, atol=1e-6)


def test_predict_eps_epsilon_model_is_raw_output(target_eps):
    x, t = _inputs(target_eps, 2)
    emb = target_eps.encode_prompts(["a", "b"]).embeds
    with torch.no_grad():
        raw = target_eps.unet(x, t, encoder_hidden_states=emb).sample
        got = target_eps.predict_eps(x, t, emb)
    assert torch.equal(got, raw)


# -- loading errors ------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index_only(folder: Path, index) -> Path:
    folder.mkdir()
    (folder / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def test_error_missing_folder(tmp_path):
    _target_error("does not exist", load_target, tmp_path / "nope", device="cpu")


def test_error_file_not_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    _target_error("is a file", load_target, f, device="cpu")


def test_error_no_model_index(tmp_path):
    (tmp_path / "empty").mkdir()
    _target_error("model_index.json", load_target, tmp_path / "empty", device="cpu")


@pytest.mark.parametrize("cls", ["StableDiffusionImg2ImgPipeline", "StableVideoDiffusionPipeline", "DDPMPipeline"])
def test_error_unsupported_pipeline_names_what_is_supported(tmp_path, cls):
    folder = _index_only(tmp_path / "other", {"_class_name": cls, "unet": ["diffusers", "UNet2DConditionModel"]})
    _target_error([f"is a {cls}, which memaudit cannot audit", "StableDiffusionPipeline"], load_target, folder,
                  device="cpu")


def test_error_transformer(tmp_path):
    folder = _index_only(tmp_path / "dit", {"_class_name": "SomeDiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]})
    _target_error("transformer", load_target, folder, device="cpu")


def test_error_invalid_json(tmp_path):
    folder = _index_only(tmp_path / "bad", "{not json")
    _target_error("JSON", load_target, folder, device="cpu")


def test_error_missing_text_encoder(tmp_path, tiny_dir_eps):
    folder = _copy(tiny_dir_eps, tmp_path / "copy")
    shutil.rmtree(folder / "text_encoder")
    _target_error("text_encoder", load_target, folder, device="cpu")


def test_error_pickled_weights(tmp_path, tiny_dir_eps):
    folder = _copy(tiny_dir_eps, tmp_path / "copy")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    msg = _target_error(("unpickl", "safetensors"), load_target, folder, device="cpu")
    assert "unet" in msg


def test_error_hub_id_not_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    (cache / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.chdir(tmp_path)  # so "someorg/somemodel" is not a local folder either
    msg = _target_error("cache", load_target, "someorg/somemodel", device="cpu")
    assert "someorg/somemodel" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_error_cuda_without_gpu(tiny_dir_eps):
    _target_error("CUDA", load_target, tiny_dir_eps, device="cuda")


def test_error_bad_dtype(tiny_dir_eps):
    _target_error("dtype", load_target, tiny_dir_eps, device="cpu", dtype="int8")
    _target_error("dtype", load_target, tiny_dir_eps, device="cpu", dtype=torch.int8)


# -- variants and saving -------------------------------------------------------------------------------------------
def test_variant_only_folder_loads(tmp_path, target_eps):
    pipe = target_eps.pipeline()
    folder = tmp_path / "variant"
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    loaded = load_target(folder, device="cpu")
    assert _same_state(loaded.unet, target_eps.unet)
    assert _same_state(loaded.vae, target_eps.vae)
    assert _same_state(loaded.text_encoder, target_eps.text_encoder)


def test_save_round_trips_through_diffusers(tmp_path, target_v):
    from diffusers import StableDiffusionPipeline

    out = target_v.save(tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    x, t = _inputs(target_v, 2)
    emb = target_v.encode_prompts(["a", "b"]).embeds
    with torch.no_grad():
        ref = target_v.unet(x, t, encoder_hidden_states=emb).sample
        got = pipe.unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(got, ref)
    # saving again over the same folder replaces it and it still loads with memaudit
    target_v.save(out)
    assert load_target(out, device="cpu").prediction_type == "v_prediction"


def test_sharded_variant_only_folder_loads(tmp_path, target_eps):
    folder = tmp_path / "sharded"
    target_eps.pipeline().save_pretrained(folder, variant="fp16", safe_serialization=True, max_shard_size="50KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    loaded = load_target(folder, device="cpu")
    assert _same_state(loaded.unet, target_eps.unet)
