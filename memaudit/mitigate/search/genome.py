"""A genome of the mask search: the mask (one bit per unit) followed by ``ceil(log2(len(lr_choices)))`` bits choosing
the learning rate, and the cache key of the (mask, learning rate) it stands for."""

from __future__ import annotations

import math
from collections.abc import Sequence

from memaudit.core.errors import ConfigError

__all__ = ["decode", "key_of", "lr_bits"]


def lr_bits(n_choices: int) -> int:
    """Bits needed to choose among ``n_choices`` learning rates."""
    if n_choices < 1:
        raise ConfigError("the search needs at least one learning rate choice.")
    return 0 if n_choices == 1 else math.ceil(math.log2(n_choices))


def decode(genome: Sequence[int | bool], n_units: int, lr_choices: Sequence[float]) -> tuple[list[int], float]:
    """The mask and learning rate a genome stands for."""
    bits = [int(b) for b in genome]
    mask, tail = bits[:n_units], bits[n_units:]
    value = int("".join(map(str, tail)), 2) if tail else 0
    return mask, float(lr_choices[value % len(lr_choices)])


def key_of(mask: Sequence[int], lr: float) -> str:
    """The cache key of an evaluation: the mask as a bit string and the learning rate."""
    return "".join(str(int(b)) for b in mask) + f"@{lr:.6g}"
