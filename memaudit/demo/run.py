"""``memaudit demo``: audit a bundled model against the faces it was fine-tuned on.

The bundled full fine-tune (or the base, with ``model="base"``) is audited with the 80 training captions as prompts
and the 20 held-out faces (not in the fine-tuning set): their captions are the reference prompts that calibrate the
denoising threshold, and their generations are compared with the held-out images for quality (KID and FID in the
bundled classifier's feature space; alignment with the same classifier, see :mod:`memaudit.demo.scorer`). Settings are sized to run in a few minutes on two CPU cores: 10 generations per prompt and a clique of 5
to flag (Carlini et al. use 500 and 10).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memaudit import demo
from memaudit.audit import AuditConfig, run_audit
from memaudit.core.errors import ConfigError

DEMO_SETTINGS = dict(generations=10, min_clique=5, steps=25, guidance=4.0, batch_size=50, features="pixels",
                     quality_features="demo", alignment="demo")


def run_demo(out: str | Path, model: str = "full_ft", redact: bool = False, device: str = "auto", seed: int = 0,
             progress: Callable[[str, int, int], None] | None = None, **overrides) -> dict:

    models = {"full_ft": demo.FULL_FT_MODEL, "base": demo.BASE_MODEL}
    if model not in models:
        raise ConfigError(f"--model {model!r} is not a bundled model; use full_ft or base.")
    path = models[model]
    if not (path / "model_index.json").exists():
        raise ConfigError(f"the bundled model {path} is missing; reinstall memaudit or run python -m memaudit.demo.build.")
    config = AuditConfig(**{**DEMO_SETTINGS, **overrides, "seed": seed, "device": device, "redact": redact})
    train = demo.faces_dataset("train")
    heldout = demo.faces_dataset("heldout")
    return run_audit(str(path), train, out, prompts=train.captions, heldout=heldout, config=config, progress=progress)
