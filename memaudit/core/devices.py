"""Devices and dtypes as users name them (``--device auto|cpu|cuda``, ``--dtype float32|float16|bfloat16``)."""

from __future__ import annotations

import torch

from memaudit.core.errors import TargetError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; asking for CUDA without one is a user error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TargetError(f"--device {device!r} is not a device; use auto, cpu or cuda.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TargetError(f"--device {device} asked for CUDA but no CUDA GPU is available; use --device cpu.")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise TargetError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16.")
        return dtype
    if dtype not in DTYPES:
        raise TargetError(f"dtype {dtype!r} is not supported; use float32, float16 or bfloat16.")
    return DTYPES[dtype]
