"""Run identities: what must match for an unfinished run (an audit's journal, a fine-tune's checkpoints, a mask
search's log) to be resumed, and how a refusal names what differs."""

from __future__ import annotations


def differences(earlier: dict, now: dict, *, options: dict[str, str] | None = None,
                parts: dict[str, str] | None = None) -> list[str]:
    """What differs between two run identities, by name, in ``now``'s order (only its keys are compared): the keys
    of ``settings`` by the option that sets them (``options``, else ``--the-name``), the other parts by what they are
    (``parts``, else the key with spaces)."""
    options, parts, names = options or {}, parts or {}, []
    for key in now:
        if earlier.get(key) == now.get(key):
            continue
        if key == "settings":
            a, b = earlier.get(key) or {}, now.get(key) or {}
            found = [options.get(k, f"--{k.replace('_', '-')}") for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            found = [parts.get(key, key.replace("_", " "))]
        names += [n for n in found if n not in names]
    return names


def listed(names: list[str], most: int = 6) -> str:
    """``names`` for a one-line message: the first ``most``, then ``...``."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
