"""A damaged fine-tune checkpoint is repaired, not a traceback (issue 20): resuming skips it for the previous intact
one, with a warning naming it, and ends where an uninterrupted run ends; when none is intact, one line says which
folder to delete."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from memaudit.core.errors import ConfigError
from memaudit.target import load_target
from memaudit.training import (
    LATEST,
    MANIFEST_FILE,
    STATE_FILE,
    TrainConfig,
    checkpoint_dirs,
    checkpoint_problem,
    latest_checkpoint,
    train_unet,
)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, learning_rate=1e-3, caption_dropout=0.0, seed=0, log_every=0,
                checkpoint_every=2, keep_checkpoints=2)
    base.update(kw)
    return TrainConfig(**base)


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir_eps, tiny_dataset, tmp_path_factory):
    """Six steps in one go: the losses and weights every repaired resume must end at."""
    target = load_target(tiny_dir_eps, device="cpu")
    result = train_unet(target, tiny_dataset, _cfg(), checkpoint_dir=tmp_path_factory.mktemp("full") / "ckpt")
    return result.losses, _weights(target.unet)


def _interrupted(tiny_dir_eps, tiny_dataset, ckpt):
    """A run stopped after step 4: checkpoints step-2 and step-4."""
    train_unet(load_target(tiny_dir_eps, device="cpu"), tiny_dataset, _cfg(steps=4), checkpoint_dir=ckpt)
    assert [p.name for p in checkpoint_dirs(ckpt)] == ["step-0000002", "step-0000004"]
    assert checkpoint_problem(ckpt / "step-0000004") is None
    return ckpt / "step-0000004"


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _zero_middle(path) -> None:
    """Damage a file in place: same size, 256 bytes in the middle zeroed (what a bad disk sector does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 256] = bytes(256)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated weights", "truncated state", "state damaged in place"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(damage, tiny_dir_eps, tiny_dataset, uninterrupted,
                                                             tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    latest = _interrupted(tiny_dir_eps, tiny_dataset, ckpt)
    if damage == "truncated weights":
        _truncate(latest / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
        why = "pipeline/unet/diffusion_pytorch_model.safetensors is"
    elif damage == "truncated state":
        _truncate(latest / STATE_FILE)
        why = f"{STATE_FILE} is"
    else:
        _zero_middle(latest / STATE_FILE)
        why = f"{STATE_FILE} is damaged"
    assert why in (checkpoint_problem(latest) or "")
    with caplog.at_level(logging.WARNING, logger="memaudit.train"):
        assert latest_checkpoint(ckpt) == ckpt / "step-0000002"
        target = load_target(tiny_dir_eps, device="cpu")
        resumed = train_unet(target, tiny_dataset, _cfg(), checkpoint_dir=ckpt)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(latest) in m and why in m and "resuming from step-0000002" in m for m in warned), warned
    assert len(warned) == 1  # said once, though both latest_checkpoint and the resume found it
    losses, weights = uninterrupted
    assert resumed.steps == 6 and resumed.losses == losses
    got = _weights(target.unet)
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in got)
    # the damaged checkpoint was written again by the resumed run
    assert checkpoint_problem(latest) is None and latest_checkpoint(ckpt) == ckpt / "step-0000006"


def test_no_intact_checkpoint_is_one_line_naming_the_folder(tiny_dir_eps, tiny_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_unet(load_target(tiny_dir_eps, device="cpu"), tiny_dataset, _cfg(steps=2, keep_checkpoints=1),
               checkpoint_dir=ckpt)
    only = ckpt / "step-0000002"
    _truncate(only / STATE_FILE, 0.9)
    assert latest_checkpoint(ckpt) is None
    with pytest.raises(ConfigError) as info:
        train_unet(load_target(tiny_dir_eps, device="cpu"), tiny_dataset, _cfg(steps=4), checkpoint_dir=ckpt)
    text = str(info.value)
    assert "\n" not in text and f"delete {ckpt} to start the run over" in text and "step-0000002 is damaged" in text
    assert only.is_dir()  # nothing is deleted for the user


def test_manifest_records_every_file_and_old_checkpoints_still_resume(tiny_dir_eps, tiny_dataset, uninterrupted,
                                                                      tmp_path):
    ckpt = tmp_path / "ckpt"
    latest = _interrupted(tiny_dir_eps, tiny_dataset, ckpt)
    files = json.loads((latest / MANIFEST_FILE).read_text())["files"]
    assert STATE_FILE in files and "pipeline/model_index.json" in files
    assert files[STATE_FILE] == (latest / STATE_FILE).stat().st_size
    # a checkpoint written before manifests existed resumes as before (its state's CRCs are still checked)
    for step in checkpoint_dirs(ckpt):
        (step / MANIFEST_FILE).unlink()
    assert checkpoint_problem(latest) is None and (ckpt / LATEST).read_text().strip() == latest.name
    target = load_target(tiny_dir_eps, device="cpu")
    assert train_unet(target, tiny_dataset, _cfg(), checkpoint_dir=ckpt).losses == uninterrupted[0]
    # a file listed in the manifest but gone is named
    (ckpt / "step-0000006" / "pipeline" / "model_index.json").unlink()
    assert checkpoint_problem(ckpt / "step-0000006") == "pipeline/model_index.json is missing"
