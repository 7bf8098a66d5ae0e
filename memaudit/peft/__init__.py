"""Parameter-efficient fine-tuning (PEFT) methods with maskable units, by name, and their adapters on disk.

``get_method(name, denoiser, granularity)`` builds one on a diffusers denoiser, UNet or transformer (changing it in
place, see :mod:`memaudit.peft.base`). Adding a method takes one new file with a :class:`PEFTMethod` subclass and
one ``register_method`` line in :mod:`memaudit.peft.registry`; a ``"module:Class"`` string registers it without
importing it until it is used.

``list_units(base, name, granularity)`` (``memaudit mitigate units``) says what the bits of a mask stand for.

- :mod:`~memaudit.peft.registry`: the methods by name (:func:`get_method`, :func:`register_method`, ...) and the
  unit table of a method.
- :mod:`~memaudit.peft.base`: :class:`PEFTMethod`, what every method shares (units, masks, adapter state, merging).
- :mod:`~memaudit.peft.units`: how trainable parameters split into units (the block layout comes from the denoiser's
  family).
- :mod:`~memaudit.peft.layers`: the layer kinds methods look for and the :class:`~memaudit.peft.layers.Wrapper`
  modules they install.
- one file per method: :mod:`~memaudit.peft.full`, :mod:`~memaudit.peft.freeze`, :mod:`~memaudit.peft.bias`,
  :mod:`~memaudit.peft.norm`, :mod:`~memaudit.peft.attention`, :mod:`~memaudit.peft.svdiff`,
  :mod:`~memaudit.peft.difffit`, :mod:`~memaudit.peft.lora`.
- :mod:`~memaudit.peft.adapters`: what a method trained, saved, loaded and merged into a plain pipeline folder.
"""

from __future__ import annotations

from memaudit.peft.adapters import export_merged, load_adapter, read_adapter_info, save_adapter
from memaudit.peft.base import PEFTMethod
from memaudit.peft.registry import (
    UnitInfo,
    available_methods,
    get_method,
    list_units,
    method_class,
    register_method,
    unit_table,
)
from memaudit.peft.units import GRANULARITIES, Unit, units_command

__all__ = ["GRANULARITIES", "PEFTMethod", "Unit", "UnitInfo", "available_methods", "export_merged", "get_method",
           "list_units", "load_adapter", "method_class", "read_adapter_info", "register_method", "save_adapter",
           "unit_table", "units_command"]
