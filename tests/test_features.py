"""Feature extractors: known outputs of the built-ins, batching, TorchScript/OpenCLIP loading and user errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memaudit.core.errors import ConfigError
from memaudit.features import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor, available, get_extractor, register


def test_builtin_names_in_order():
    assert available()[:4] == ["pixels", "open_clip", "torchscript", "inception"]


def test_pixels_same_size_is_exact_flatten():
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ext = get_extractor("pixels", size=8)
    assert ext.dim is None  # pixels learns its dimension from the first images
    out = ext(images)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.equal(out, images.reshape(2, -1))
    assert ext.dim == 64


def test_pixels_resizes_and_grayscale_from_strings():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = get_extractor("pixels", size="4", grayscale="true")(images)  # CLI options arrive as strings
    luma = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    expected = F.interpolate(luma, size=(4, 4), mode="bilinear", align_corners=False, antialias=True).reshape(3, -1)
    assert out.shape == (3, 16)
    torch.testing.assert_close(out, expected)
    # a constant image stays constant after resizing
    flat = get_extractor("pixels", size=4)(torch.full((1, 3, 10, 10), 0.25))
    torch.testing.assert_close(flat, torch.full((1, 48), 0.25))


def test_pixels_bad_option():
    with pytest.raises(ConfigError, match="no option 'colour'"):
        get_extractor("pixels", colour=True)
    with pytest.raises(ConfigError, match="size"):
        get_extractor("pixels", size="big")


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.linear(self.flatten(x))


def test_custom_module_batched_equals_single_pass():
    torch.manual_seed(0)
    net = _TinyNet()
    images = torch.rand(7, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = net(images)
    batched = get_extractor(net, batch_size=3)
    assert batched.name == "custom:_TinyNet"
    assert not net.training
    out = batched(images)
    assert out.shape == (7, 5) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert not out.requires_grad
    assert batched.dim == 5
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, get_extractor(net, batch_size=64)(images))


def test_float64_module_output_comes_back_float32():
    class Double(nn.Module):
        def forward(self, x):
            return x.double().flatten(1) * 3

    out = get_extractor(Double(), batch_size=2)(torch.ones(3, 1, 2, 2))
    assert out.dtype == torch.float32 and torch.equal(out, torch.full((3, 4), 3.0))


def test_custom_module_with_options_is_rejected():
    with pytest.raises(ConfigError, match="do not apply"):
        get_extractor(_TinyNet(), size=3)


def test_bad_images_are_rejected():
    ext = get_extractor("pixels", size=4)
    with pytest.raises(ConfigError, match=r"\[N, C, H, W\]"):
        ext(torch.rand(3, 4, 4))
    with pytest.raises(ConfigError, match="float"):
        ext(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_torchscript_matches_manual_preprocessing(tmp_path):
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    module = Pool().eval()
    path = tmp_path / "tiny.torchscript.pt"
    torch.jit.save(torch.jit.script(module), str(path))

    ext = get_extractor("torchscript", path=str(path), size=16, batch_size=2)
    assert ext.dim == 6  # discovered by a dummy batch at construction
    images = torch.rand(3, 1, 20, 24, generator=torch.Generator().manual_seed(3))  # grayscale, not square
    manual = F.interpolate(images.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", align_corners=False,
                           antialias=True)
    manual = (manual - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = module(manual)
    torch.testing.assert_close(ext(images), expected, rtol=1e-5, atol=1e-6)


def test_torchscript_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="path"):
        get_extractor("torchscript")
    with pytest.raises(ConfigError, match="no such file"):
        get_extractor("torchscript", path=str(tmp_path / "absent.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    from memaudit.core.errors import DataError

    with pytest.raises(DataError, match="bad.pt"):
        get_extractor("torchscript", path=str(bad))


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError) as info:
        get_extractor("xyz")
    msg = str(info.value)
    assert "'xyz' does not exist" in msg
    assert "pixels, open_clip, torchscript, inception" in msg and "nn.Module" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["open_clip", "inception"])
def test_weights_required(name, tmp_path):
    with pytest.raises(ConfigError, match="weights") as info:
        get_extractor(name)
    assert "download" in str(info.value)
    with pytest.raises(ConfigError, match="no such file"):
        get_extractor(name, weights=str(tmp_path / "absent.safetensors"))


def test_register_new_extractor(monkeypatch):
    import memaudit.features as features

    monkeypatch.setattr(features, "_REGISTRY", dict(features._REGISTRY))

    def double(device="cpu", batch_size=64, **options):
        return FeatureExtractor(nn.Flatten(), "double", lambda x: 2 * x, device=device, batch_size=batch_size)

    register("double", double)
    assert "double" in available()
    torch.testing.assert_close(get_extractor("double")(torch.ones(1, 1, 2, 2)), torch.full((1, 4), 2.0))
    with pytest.raises(ConfigError, match="already registered"):
        register("double", double)


def test_open_clip_local_safetensors(tmp_path, monkeypatch):
    """A real (tiny) OpenCLIP architecture, saved as safetensors and loaded back through get_extractor.

    ViT-B-32 itself takes several seconds to build and ~350 MB to save on this CPU, so a tiny config registered for
    this test stands in for it; the loading code path is the same.
    """
    open_clip = pytest.importorskip("open_clip")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    cfg = {"embed_dim": 24,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "memaudit-tiny-test", cfg)
    torch.manual_seed(0)
    model = open_clip.create_model("memaudit-tiny-test", pretrained=None, load_weights=False).eval()
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    ext = get_extractor("open_clip", model="memaudit-tiny-test", weights=str(weights))
    assert ext.dim == 24 and ext.name == "open_clip:memaudit-tiny-test"
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(4))
    x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.encode_image(x)
    out = ext(images)
    assert out.shape == (2, 24)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    # weights of another architecture are a DataError naming the file, not a traceback from load_state_dict
    other = dict(cfg, vision_cfg=dict(cfg["vision_cfg"], width=48, head_width=16))
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "memaudit-tiny-other", other)
    from memaudit.core.errors import DataError

    with pytest.raises(DataError, match="tiny.safetensors"):
        get_extractor("open_clip", model="memaudit-tiny-other", weights=str(weights))
    with pytest.raises(ConfigError, match="not an OpenCLIP architecture"):
        get_extractor("open_clip", model="no-such-arch", weights=str(weights))
