"""The bundled settings ``memaudit demo --setting NAME`` audits: each a base, its full fine-tune, the fine-tune set
and held-out items of the same domain, a classifier for quality and alignment, and the audit settings sized for two
CPU cores.

- ``faces`` (the default): a base trained on MNIST digits, fine-tuned on 80 LFW faces (:mod:`memaudit.demo`). The
  base cannot draw a face, so memorization is all or nothing.
- ``fashion``: a base trained on Fashion-MNIST's 60,000 training images, fine-tuned on new products with graded
  duplication (:mod:`memaudit.demo.fashion`): the base draws the domain and the fine-tune memorizes some products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memaudit import demo
from memaudit.demo import fashion

__all__ = ["DEFAULT_SETTING", "SETTINGS", "DemoSetting", "setting_names"]


@dataclass(frozen=True)
class DemoSetting:
    name: str
    summary: str
    models: dict[str, Path]
    train: Callable[[], object]
    heldout: Callable[[], object]
    audit: dict = field(default_factory=dict)
    #: the training captions the demo audits (default: all)
    prompts: Callable[[list[str]], list[str]] = list


#: audit settings of a demo: 10 generations per prompt and a clique of 5 (Carlini et al.: 500 and 10), sized to run
#: in a few minutes on two CPU cores
_AUDIT = dict(generations=10, min_clique=5, steps=25, guidance=4.0, batch_size=50, features="pixels")

SETTINGS = {
    "faces": DemoSetting(
        "faces", "base on MNIST digits, fully fine-tuned on 80 LFW faces (memorizes all or nothing)",
        {"full_ft": demo.FULL_FT_MODEL, "base": demo.BASE_MODEL},
        lambda: demo.faces_dataset("train"), lambda: demo.faces_dataset("heldout"),
        {**_AUDIT, "quality_features": "demo", "alignment": "demo"}),
    "fashion": DemoSetting(
        "fashion", "base on Fashion-MNIST, fully fine-tuned on new products seen 1 to 32 times (memorizes some)",
        {"full_ft": fashion.FASHION_DIR / "full_ft", "base": fashion.FASHION_DIR / "base"},
        lambda: fashion.products_dataset("train"), lambda: fashion.products_dataset("heldout", every=10),
        {**_AUDIT, "quality_features": "fashion", "alignment": "fashion"},
        # 30 of the 180 products (5 at each duplication level) and 20 held-out products (2 per class), half the images
        # of the faces demo, to run in 3 minutes on two CPU cores; benchmarks/duplication.py audits every product
        prompts=fashion.demo_prompts),
}
DEFAULT_SETTING = "faces"


def setting_names() -> list[str]:
    return list(SETTINGS)
