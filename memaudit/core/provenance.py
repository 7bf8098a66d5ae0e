"""What a result was made with: library versions and the machine, recorded in every result file."""

from __future__ import annotations

import platform

import numpy as np
import torch

from memaudit import __version__


def versions(*, faiss: bool = True) -> dict:
    """Versions of memaudit and the libraries a result depends on (``faiss`` too when asked and installed)."""
    import diffusers  # measured import cost (about 1 s): only when a result is written
    import transformers

    out = {"memaudit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version()}
    if faiss:
        try:
            import faiss as faiss_module  # optional dependency

            out["faiss"] = faiss_module.__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def machine(device) -> str:
    """What work on ``device`` runs on: the GPU's name, or the CPU and its torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
