"""SV-DIFF (Han et al., "SVDiff: Compact Parameter Space for Diffusion Fine-Tuning", ICCV 2023).

Every weight matrix is decomposed once, ``W = U diag(S) V^T`` (a convolution kernel ``[out, in, k, k]`` as the
matrix ``[out, in*k*k]``), and only a shift of its singular values trains:
``W' = U diag(relu(S + delta)) V^T``, ``delta`` initialized to 0 (one scalar per singular value). Biases stay frozen.

Here it covers every ``Conv2d`` and ``Linear`` of the denoiser (a UNet's convolutions and attention projections; a
DiT's patch embedding, attention and feed-forward projections, embedders and the ``Linear`` layers of its adaptive
norms) and also the weight vector of every normalization layer that has one (``GroupNorm``, ``LayerNorm``, torch's and
diffusers' ``RMSNorm``: Flux's and SD3.5's query/key norms), treated as a diagonal matrix whose shift is added directly
(``w' = w + delta``; no ReLU, since norm weights may be negative).

Implementation: the layer is replaced by a wrapper that keeps ``U``, ``S`` and ``V^T`` as float32 buffers (not saved
in the ``state_dict``) and the original weight as a frozen parameter, and computes
``W' = W + U diag(relu(S + delta) - S) V^T`` at each forward: the same matrix as the paper's formula, but exactly the
original weight while ``delta`` is 0, so a freshly installed method, and every layer a mask leaves off, is bit-for-bit
the base model (also after :meth:`merge`). Without gradients (sampling) the merged weight is cached until ``delta``
changes. Learning rate 1e-3 (our choice: a small parameter set needs a larger rate than full fine-tuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memaudit.peft.base import PEFTMethod
from memaudit.peft.layers import Wrapper, is_norm, replace_module


class SpectralShift(Wrapper):
    """A ``Linear`` or ``Conv2d`` whose singular values are shifted by the trainable ``delta``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        w = self.weight.detach().float().reshape(self.weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("U", u.contiguous(), persistent=False)
        self.register_buffer("S", s.contiguous(), persistent=False)
        self.register_buffer("Vh", vh.contiguous(), persistent=False)
        self.delta = torch.nn.Parameter(torch.zeros_like(s))
        self._cache: tuple | None = None

    def _shifted(self) -> torch.Tensor:
        shift = torch.relu(self.S + self.delta) - self.S
        update = ((self.U * shift) @ self.Vh).reshape(self.weight.shape)
        return self.weight + update.to(self.weight.dtype)

    def effective_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.delta.requires_grad:
            self._cache = None
            return self._shifted()
        key = (self.delta._version, self.delta.data_ptr(), self.weight.data_ptr(), self.weight.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                w = self._shifted() if bool(torch.any(self.delta != 0)) else self.weight
            self._cache = (key, w)
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if isinstance(self._plain, torch.nn.Conv2d):
            return self._plain._conv_forward(x, weight, self.bias)
        return F.linear(x, weight, self.bias)

    def merged_weight(self) -> torch.Tensor:
        return self._shifted() if bool(torch.any(self.delta != 0)) else self.weight


class NormShift(Wrapper):
    """A normalization layer (``GroupNorm``, ``LayerNorm``, ``RMSNorm``) whose weight (a diagonal) is shifted by the
    trainable ``delta``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__(layer)
        self.delta = torch.nn.Parameter(torch.zeros_like(self.weight, dtype=torch.float32))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.delta.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, weight = self._plain, self.merged_weight()
        if isinstance(layer, torch.nn.GroupNorm):
            return F.group_norm(x, layer.num_groups, weight, self.bias, layer.eps)
        if isinstance(layer, torch.nn.LayerNorm):
            return F.layer_norm(x, layer.normalized_shape, weight, self.bias, layer.eps)
        if isinstance(layer, torch.nn.RMSNorm):
            return F.rms_norm(x, layer.normalized_shape, weight, layer.eps)
        # any other norm (diffusers' RMSNorm): its own forward, with the shifted weight in place of its own
        tensors = {"weight": weight} if self.bias is None else {"weight": weight, "bias": self.bias}
        return torch.func.functional_call(layer, tensors, (x,))


class SVDiff(PEFTMethod):
    """SV-DIFF spectral shifts on every Conv2d and Linear (and norm weight) of the denoiser; see the module
    docstring."""

    name = "svdiff"
    default_lr = 1e-3
    description = "singular-value shifts of every conv, linear and norm weight (Han et al. 2023)"

    def _install(self) -> None:
        targets = []
        for name, m in self.denoiser.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None:
                targets.append((name, SpectralShift))
            elif is_norm(m) and getattr(m, "weight", None) is not None:
                targets.append((name, NormShift))
        for name, cls in targets:
            replace_module(self.denoiser, name, cls(self.denoiser.get_submodule(name)))

    def _trainable_names(self) -> list[str]:
        return [f"{n}.delta" for n, m in self.denoiser.named_modules() if isinstance(m, (SpectralShift, NormShift))]

    def _merge(self) -> None:
        wrapped = [(n, m) for n, m in self.denoiser.named_modules() if isinstance(m, (SpectralShift, NormShift))]
        for name, m in wrapped:
            replace_module(self.denoiser, name, m.restore())
