"""Durations as ad ops write them: ``90s``, ``30m``, ``12h``, ``14d``, ``2w``."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_duration(text: object) -> float:
    """Seconds in ``text``; raises ValueError with a message fit for an ad-ops error."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"a duration is text like '14d' or '12h', got {text!r}")
    match = _PATTERN.match(text)
    if match is None:
        raise ValueError(
            f"'{text}' is not a duration; write a number and a unit s/m/h/d/w, e.g. '14d'"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"'{text}' must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
