"""``memaudit demo``: audit a bundled model against the data it was fine-tuned on.

The chosen setting's full fine-tune (or its base, with ``model="base"``) is audited with its fine-tune set's
captions as prompts and its held-out items: their captions are the reference prompts that calibrate the denoising
threshold, and their generations are compared with the held-out images for quality (KID and FID in the setting's
classifier's feature space; alignment with the same classifier, see :mod:`memaudit.demo.scorer`). The settings
(:mod:`memaudit.demo.settings`) are sized to run in a few minutes on two CPU cores: 10 generations per prompt and a
clique of 5 to flag (Carlini et al. use 500 and 10).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memaudit.audit import AuditConfig, run_audit
from memaudit.core.errors import ConfigError
from memaudit.demo.settings import DEFAULT_SETTING, SETTINGS

#: the faces setting's audit settings (kept for callers of the first release)
DEMO_SETTINGS = dict(SETTINGS["faces"].audit)


def run_demo(out: str | Path, model: str = "full_ft", redact: bool = False, device: str = "auto", seed: int = 0,
             progress: Callable[[str, int, int], None] | None = None, setting: str = DEFAULT_SETTING,
             **overrides) -> dict:
    if setting not in SETTINGS:
        raise ConfigError(f"--setting {setting!r} is not a bundled setting; use one of: {', '.join(SETTINGS)}.")
    chosen = SETTINGS[setting]
    if model not in chosen.models:
        raise ConfigError(f"--model {model!r} is not a bundled model; use {' or '.join(chosen.models)}.")
    path = chosen.models[model]
    if not (path / "model_index.json").exists():
        raise ConfigError(f"the model {path} is not built; build it with python -m memaudit.demo.build --setting "
                          f"{setting} (or reinstall memaudit if it shipped with it).")
    config = AuditConfig(**{**chosen.audit, **overrides, "seed": seed, "device": device, "redact": redact})
    train, heldout = chosen.train(), chosen.heldout()
    return run_audit(str(path), train, out, prompts=chosen.prompts(train.captions), heldout=heldout, config=config,
                     progress=progress)
