"""NaN in the model's first prediction is named as the model's, in one line, before sampling goes on."""

from __future__ import annotations

import pytest
import torch

from memaudit.core.errors import TargetError
from memaudit.families.base import nonfinite_prediction_error
from memaudit.sampling import Sampler
from memaudit.target import from_pipeline
from memaudit.tiny_families import tiny_family

STEPS = 3


def _broken_target(name: str, path: str):
    """A tiny pipeline whose denoiser's output layer is NaN (the rest finite), as a Target loaded from ``path``."""
    pipe = tiny_family(name)
    target = from_pipeline(pipe, device="cpu", path=path)
    out_layer = pipe.unet.conv_out if name == "sd" else pipe.transformer.proj_out
    return target, out_layer


def _calls(module):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    return counter, module.register_forward_hook(hook)


@pytest.mark.parametrize("name", ["sd", "flux-dev"])
def test_nan_weights_stop_sampling_at_the_first_call(name):
    target, out_layer = _broken_target(name, "/models/broken")
    with torch.no_grad():
        out_layer.weight.fill_(float("nan"))
    counter, handle = _calls(target.denoiser)
    try:
        with pytest.raises(TargetError) as err:
            list(Sampler(target, steps=STEPS, guidance=4.0, batch_size=2, seed=0).run(["a photo", "a cat"], 2))
    finally:
        handle.remove()
    message = str(err.value)
    assert message.startswith("the model at /models/broken predicts NaN at the first sampling step")
    assert "broken" in message and "\n" not in message
    assert counter["n"] == 1  # no other step, no extra (Flux) call, no second batch


def test_first_step_norms_check_too_and_name_the_loras():
    target, out_layer = _broken_target("sd", "/models/base")
    target.loras = [{"path": "/adapters/style.safetensors", "sha256": "0" * 64, "scale": 1.0}]
    with torch.no_grad():
        out_layer.bias.fill_(float("inf"))
    with pytest.raises(TargetError, match=r"^the model at /models/base with LoRA /adapters/style\.safetensors "
                                          r"predicts infinite values at the first sampling step"):
        Sampler(target, steps=STEPS, guidance=4.0, batch_size=2).first_step_norms(["a photo"], 2)


def test_checked_once_per_sampler():
    """The check costs one device sync: only a sampler's first batch is checked."""
    target, out_layer = _broken_target("sd", "")
    sampler = Sampler(target, steps=STEPS, guidance=4.0, batch_size=2, seed=0)
    images, norms, _, _ = sampler.sample_batch(["a photo", "a cat"], [1, 2])
    assert sampler.checked_finite and torch.isfinite(images).all() and torch.isfinite(norms).all()
    with torch.no_grad():
        out_layer.weight.fill_(float("nan"))
    images, _, _, _ = sampler.sample_batch(["a photo", "a cat"], [1, 2])  # not checked again: the NaN goes through
    assert torch.isnan(images).all()
    with pytest.raises(TargetError, match="^the model predicts NaN"):  # a new sampler checks again
        Sampler(target, steps=STEPS, guidance=4.0, batch_size=2).sample_batch(["a photo"], [1])


def test_message_for_low_precision():
    half = str(nonfinite_prediction_error("the model at m", torch.float16))
    assert half == ("the model at m predicts NaN at the first sampling step: its weights are broken or overflow in "
                    "float16; load it in float32 (--dtype float32) or check the checkpoint and its LoRA adapters. "
                    "Sampling stopped.")
    full = str(nonfinite_prediction_error("the model at m", torch.float32, nan=False))
    assert full == ("the model at m predicts infinite values at the first sampling step: its weights (or its LoRA "
                    "adapters') are broken; check the checkpoint. Sampling stopped.")
