"""Values as the report's text: numbers to short strings, HTML escaping, and the finite numbers among loose values.

Shared by the plots, the sentences and the page, so that a number reads the same everywhere in the report.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from typing import Any


def esc(value: Any) -> str:
    """``value`` as text safe in HTML content and attribute values; None as the empty string."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers to short text: ints as they are, floats to ``digits`` significant digits; None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def fmt_seconds(value: Any) -> str:
    """A duration in seconds as ``"12.34 s"``, with ``(h:mm:ss)`` from two minutes on."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        text = f"{fmt(float(value))} s"
        if value >= 120:
            m, s = divmod(int(round(value)), 60)
            h, m = divmod(m, 60)
            text += f" ({h}:{m:02d}:{s:02d})"
        return text
    return fmt(value)


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None (None, booleans, strings, NaN, infinities and non-numbers)."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compact(value: Any) -> str:
    """Objects and lists as one line of JSON, anything else as :func:`fmt` writes it."""
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return fmt(value)


def as_int(value: Any) -> int | None:
    """``value`` when it is an int (not a boolean), else None."""
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def finite_floats(values: Iterable[Any]) -> list[float]:
    """The finite numbers among ``values`` as floats, in order (None, booleans, strings, NaN and infinities skipped)."""
    out = []
    for v in values:
        if v is None or isinstance(v, (bool, str)):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out

