"""Tests for memaudit.training: the shared UNet training loop, its checkpoints and hooks, and VAE training."""

from __future__ import annotations

import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.data import ImageCaptionDataset, load_dataset
from memaudit.latents import DatasetLatents
from memaudit.target import Target, load_target
from memaudit.testing import save_image_folder
from memaudit.training import (
    TrainConfig,
    TrainHook,
    VAEConfig,
    checkpoint_dirs,
    latest_checkpoint,
    train_unet,
    train_vae,
)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0, log_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def fresh(tiny_dir_eps):
    """A loader of fresh float32 CPU targets from the tiny epsilon pipeline folder."""
    return lambda: load_target(tiny_dir_eps, device="cpu")


def test_training_lowers_the_loss(fresh, tiny_dataset):
    target = fresh()
    result = train_unet(target, tiny_dataset, _cfg(steps=40, batch_size=4, learning_rate=1e-3, seed=0))
    assert result.steps == 40 and len(result.losses) == 40 and result.skipped_steps == 0
    assert result.final_loss == result.losses[-1]
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)  # about 1.0 -> 0.7 for seeds 0..7
    # the target is handed back frozen and in eval mode
    assert not target.unet.training
    assert all(not p.requires_grad for p in target.unet.parameters())


def test_only_given_params_change(fresh, tiny_dataset):
    target = fresh()
    before = {name: _weights(getattr(target, name)) for name in ("unet", "vae", "text_encoder")}
    train_unet(target, tiny_dataset, _cfg(steps=3), params=list(target.unet.conv_out.parameters()))
    after = {name: _weights(getattr(target, name)) for name in ("unet", "vae", "text_encoder")}
    assert _same(before["vae"], after["vae"])
    assert _same(before["text_encoder"], after["text_encoder"])
    changed = {k for k in before["unet"] if not torch.equal(before["unet"][k], after["unet"][k])}
    assert changed == {"conv_out.weight", "conv_out.bias"}


def test_params_as_callable(fresh, tiny_dataset):
    target = fresh()
    before = _weights(target.unet)
    train_unet(target, tiny_dataset, _cfg(steps=2), params=lambda t: t.unet.conv_in.parameters())
    after = _weights(target.unet)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"conv_in.weight", "conv_in.bias"}


def test_same_seed_same_weights_other_seed_differs(fresh, tiny_dataset):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        target = fresh()
        result = train_unet(target, tiny_dataset, _cfg(steps=3, seed=seed))
        runs[name] = (_weights(target.unet), result.losses)
    assert _same(runs["a"][0], runs["b"][0])
    assert runs["a"][1] == runs["b"][1]
    assert not _same(runs["a"][0], runs["c"][0])


def test_resume_matches_uninterrupted_run(fresh, tiny_dataset, tmp_path):
    full_target, full_logs, resumed_logs = fresh(), {}, {}
    full = train_unet(full_target, tiny_dataset, _cfg(steps=6, checkpoint_every=2), checkpoint_dir=tmp_path / "full",
                      progress=lambda step, total, logs: full_logs.update({step: logs["running_loss"]}))
    assert [p.name for p in checkpoint_dirs(tmp_path / "full")] == ["step-0000006"]  # keep_checkpoints=1

    ckpt = tmp_path / "split"
    part = train_unet(fresh(), tiny_dataset, _cfg(steps=4, checkpoint_every=2), checkpoint_dir=ckpt)
    assert part.steps == 4
    assert latest_checkpoint(ckpt) == ckpt / "step-0000004"
    resumed_target = fresh()  # weights come from the checkpoint, not from this target
    resumed = train_unet(resumed_target, tiny_dataset, _cfg(steps=6, checkpoint_every=2), checkpoint_dir=ckpt,
                         progress=lambda step, total, logs: resumed_logs.update({step: logs["running_loss"]}))
    assert resumed.steps == 6
    assert resumed.losses == full.losses
    assert resumed_logs == {5: full_logs[5], 6: full_logs[6]}  # the running loss goes on, not over
    assert _same(_weights(resumed_target.unet), _weights(full_target.unet))
    assert latest_checkpoint(ckpt) == ckpt / "step-0000006"
    # the checkpoint's pipeline folder is the trained model
    saved = load_target(latest_checkpoint(ckpt) / "pipeline", device="cpu")
    assert _same(_weights(saved.unet), _weights(full_target.unet))


def test_resume_false_starts_over(fresh, tiny_dataset, tmp_path):
    ckpt = tmp_path / "ck"
    first = train_unet(fresh(), tiny_dataset, _cfg(steps=2, seed=0), checkpoint_dir=ckpt)
    again = train_unet(fresh(), tiny_dataset, _cfg(steps=2, seed=1), checkpoint_dir=ckpt, resume=False)
    assert again.steps == 2 and len(again.losses) == 2
    assert again.losses != first.losses  # a resumed run would have taken the first run's losses over


def test_resume_false_checkpoint_survives_older_run(fresh, tiny_dataset, tmp_path):
    ckpt = tmp_path / "ck"
    train_unet(fresh(), tiny_dataset, _cfg(steps=3), checkpoint_dir=ckpt)
    train_unet(fresh(), tiny_dataset, _cfg(steps=2, seed=1), checkpoint_dir=ckpt, resume=False)
    assert (ckpt / "latest").read_text().strip() == "step-0000002"
    assert latest_checkpoint(ckpt) == ckpt / "step-0000002"


def test_failed_checkpoint_keeps_previous(fresh, tiny_dataset, tmp_path):
    ckpt = tmp_path / "ck"
    first_target = fresh()
    train_unet(first_target, tiny_dataset, _cfg(steps=2), checkpoint_dir=ckpt)
    previous = latest_checkpoint(ckpt)
    assert previous == ckpt / "step-0000002"

    def broken_save(target, path):
        path.mkdir(parents=True)
        (path / "model_index.json").write_text("{\"_class_name\": \"StableDiffus")  # half-written
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        train_unet(fresh(), tiny_dataset, _cfg(steps=4), checkpoint_dir=ckpt, save_pipeline=broken_save)
    assert latest_checkpoint(ckpt) == previous
    assert checkpoint_dirs(ckpt) == [previous]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-0000002"]  # no .tmp- folder left
    assert (ckpt / "latest").read_text().strip() == "step-0000002"
    reloaded = load_target(previous / "pipeline", device="cpu")
    assert _same(_weights(reloaded.unet), _weights(first_target.unet))


class _ZeroWeights(TrainHook):
    def sample_weights(self, ctx, state):
        return torch.zeros_like(ctx.per_sample_loss)


class _RecordCaptions(TrainHook):
    def __init__(self):
        self.captions: list[str] = []

    def on_batch(self, batch, state):
        self.captions.extend(batch.captions)
        return batch


def test_zero_sample_weights_skip_every_step(fresh, tiny_dataset):
    target = fresh()
    before = _weights(target.unet)
    steps = []
    result = train_unet(target, tiny_dataset, _cfg(steps=3), hooks=[_ZeroWeights()],
                        progress=lambda step, total, logs: steps.append((step, total, logs.get("skipped"))))
    assert result.skipped_steps == 3 and result.steps == 3
    assert result.losses == []
    assert steps == [(1, 3, True), (2, 3, True), (3, 3, True)]
    assert _same(before, _weights(target.unet))


def test_hooks_see_caption_dropout(fresh, tiny_dataset):
    captions = set(tiny_dataset.captions)
    none = _RecordCaptions()
    train_unet(fresh(), tiny_dataset, _cfg(steps=4, batch_size=4, caption_dropout=0.0), hooks=[none])
    assert len(none.captions) == 16
    assert all(c in captions for c in none.captions)
    # an epoch is a permutation: 16 draws from 8 images see each image twice
    assert sorted(none.captions) == sorted(tiny_dataset.captions * 2)

    half, again = _RecordCaptions(), _RecordCaptions()
    train_unet(fresh(), tiny_dataset, _cfg(steps=4, batch_size=4, caption_dropout=0.5, seed=1), hooks=[half])
    train_unet(fresh(), tiny_dataset, _cfg(steps=4, batch_size=4, caption_dropout=0.5, seed=1), hooks=[again])
    assert half.captions == again.captions
    dropped = sum(c == "" for c in half.captions)
    assert 2 <= dropped <= 14, half.captions
    assert all(c == "" or c in captions for c in half.captions)


def _png_folder(path, dataset):
    return save_image_folder(dataset, path)


def test_training_from_a_folder_streams_and_ends_where_the_same_pixels_in_memory_end(fresh, make_dataset, tmp_path,
                                                                                       monkeypatch):
    """70 PNGs (more than one encoding batch of 64): nothing ever holds the whole set. The images are decoded and
    encoded at most 64 at a time, each step reads only its own batch's latents from the cache, and the weights are
    those of training on the same pixels held in memory."""
    ds = load_dataset(_png_folder(tmp_path / "data", make_dataset(n=70, seed=5)), 16, 3)
    assert ds.images is None
    in_memory = ImageCaptionDataset(ds.captions, ds.names, images=ds.read(range(70)))
    reference = fresh()
    train_unet(reference, in_memory, _cfg(steps=3, batch_size=5), cache_dir=tmp_path / "c1")

    sizes: dict[str, list[int]] = {"read": [], "batch": [], "encode": [], "latents": []}
    real_read, real_batches = ImageCaptionDataset.read, ImageCaptionDataset.batches
    real_encode, real_entries = Target.encode_images, DatasetLatents.entries

    def read(self, indices):
        out = real_read(self, indices)
        sizes["read"].append(len(out))
        assert len(out) <= 64, "read more than a batch"
        return out

    def batches(self, *args, **kwargs):
        for index, images in real_batches(self, *args, **kwargs):
            sizes["batch"].append(len(images))
            yield index, images

    def encode(self, images, batch_size=64):
        sizes["encode"].append(len(images))
        return real_encode(self, images, batch_size)

    def entries(self, indices):
        out = real_entries(self, indices)
        sizes["latents"].append(len(out))
        return out

    monkeypatch.setattr(ImageCaptionDataset, "read", read)
    monkeypatch.setattr(ImageCaptionDataset, "batches", batches)
    monkeypatch.setattr(Target, "encode_images", encode)
    monkeypatch.setattr(DatasetLatents, "entries", entries)
    streamed = fresh()
    result = train_unet(streamed, ds, _cfg(steps=3, batch_size=5), cache_dir=tmp_path / "c2")
    assert sizes["batch"] == sizes["encode"] == [64, 6]
    assert all(n <= 64 for n in sizes["read"])
    assert sizes["latents"] == [5, 5, 5]  # one read per micro-batch, of that batch only
    assert result.latent_cache["encoded"] == 70 and result.latent_cache["status"] == "built"
    assert _same(_weights(streamed.unet), _weights(reference.unet))


def test_the_latent_cache_is_built_once_then_reused(fresh, tiny_dataset, tmp_path, monkeypatch):
    encoded = []
    real_encode = Target.encode_images
    monkeypatch.setattr(Target, "encode_images",
                        lambda self, images, batch_size=64: encoded.append(len(images)) or real_encode(self, images, batch_size))
    first, second = fresh(), fresh()
    a = train_unet(first, tiny_dataset, _cfg(steps=2), cache_dir=tmp_path)
    assert encoded == [8] and (a.latent_cache["status"], a.latent_cache["encoded"], a.latent_cache["found"]) == ("built", 8, 0)
    b = train_unet(second, tiny_dataset, _cfg(steps=2), cache_dir=tmp_path)
    assert encoded == [8] and (b.latent_cache["status"], b.latent_cache["encoded"], b.latent_cache["found"]) == ("reused", 0, 8)
    assert b.latent_cache["path"].startswith(str(tmp_path / "latents"))
    assert _same(_weights(first.unet), _weights(second.unet)) and a.losses == b.losses


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"mixed_precision": "int4"}, {"caption_dropout": 1.0},
                                    {"batch_size": 0}, {"learning_rate": 0.0}])
def test_bad_config(kwargs):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_channel_mismatch(fresh, make_dataset, tmp_path):
    gray = make_dataset(n=4, channels=1)
    assert gray.images.shape == (4, 1, 16, 16)
    with pytest.raises(ConfigError, match="channel"):
        train_unet(fresh(), gray, _cfg(steps=1), cache_dir=tmp_path)
    assert not (tmp_path / "latents").exists()  # refused before anything is encoded


def test_half_precision_target_refused(tiny_dir_eps, tiny_dataset):
    with pytest.raises(ConfigError, match="float32"):
        train_unet(load_target(tiny_dir_eps, device="cpu", dtype="bfloat16"), tiny_dataset, _cfg(steps=1))


def _smooth_images(n: int = 8, seed: int = 0) -> torch.Tensor:
    """Colour ramps in [-1, 1]: structure a tiny VAE can learn in a few steps (random noise it cannot)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g)
    slope = torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 16).reshape(1, 1, 1, 16)
    return ((0.6 * base + 0.4 * slope * ramp).expand(n, 3, 16, 16) * 2 - 1).contiguous()


def _recon_error(vae, images) -> float:
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mean).sample
    return float((recon - images).pow(2).mean())


def test_train_vae_lowers_reconstruction_loss():
    from memaudit.testing import tiny_pipeline

    images = _smooth_images()
    vae = tiny_pipeline(seed=5).vae
    before = _recon_error(vae, images)
    result = train_vae(vae, images, VAEConfig(steps=30, batch_size=4, learning_rate=1e-3, seed=0))
    assert result.steps == 30 and len(result.losses) == 30
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)  # about 0.3-0.6x for other seeds too
    assert _recon_error(vae, images) < 0.75 * before
    assert not vae.training
    assert all(not p.requires_grad for p in vae.parameters())


def test_bad_vae_config():
    with pytest.raises(ConfigError):
        VAEConfig(steps=0)
