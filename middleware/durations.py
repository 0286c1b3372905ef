"""Durations as written in YAML: a number of seconds (``30``, ``0.5``) or a string with a unit
(``500ms``, ``30s``, ``5m``, ``24h``, ``7d``); ``forever`` where a limit may be switched off.

    parse_duration("5m")          # 300.0
    parse_duration("forever")     # None (no limit)

:data:`DURATION` is the JSON Schema of such a value, so ``validate`` reports a bad one at its line.
"""

from __future__ import annotations

import re
from typing import Any

FOREVER = "forever"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)$"
_TEXT = re.compile(_PATTERN)

DURATION: dict[str, Any] = {  # a duration key's schema: seconds, or a number with a unit
    "anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": _PATTERN}],
}
DURATION_OR_FOREVER: dict[str, Any] = {"anyOf": [*DURATION["anyOf"], {"const": FOREVER}]}


def parse_duration(value: object) -> float | None:
    """Seconds in ``value`` (a number or ``"<n><unit>"``), None for ``forever``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    text = str(value).strip()
    if text == FOREVER:
        return None
    match = _TEXT.match(text)
    if match is None:
        raise ValueError(f"not a duration: {value!r} (write e.g. 30s, 5m, 24h or {FOREVER})")
    unit = match.group(2)
    return float(text[: -len(unit)]) * _UNITS[unit]


def format_duration(seconds: float | None) -> str:
    """``seconds`` the way a person writes it (``5m``, ``90s``, ``forever``), for logs and docs."""
    if seconds is None:
        return FOREVER
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
