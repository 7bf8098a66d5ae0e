"""No training at all: the base model, as a method so that searches and reports can include it."""

from __future__ import annotations

from memaudit.peft.base import PEFTMethod


class Freeze(PEFTMethod):
    """Nothing trains: no units, an empty trainable set, ``parameters_for([]) == []`` (the caller skips training)."""

    name = "freeze"
    default_lr = 1e-4
    description = "no parameter (the base model)"

    def _trainable_names(self) -> list[str]:
        return []
