"""JSON in and out of bid requests without changing any value we did not mean to change.

orjson keeps key order and round-trips every double exactly, so it does nearly all the work.
Its one lossy spot: an integer outside [-2**63, 2**64 - 1] is parsed as a float, silently
rounding it (an id like 18446744073709551617 would come back as 1.8446744073709552e+19).
Such a literal has at least 19 digits, so when the raw bytes hold a 19-digit run we parse
with the standard library instead, which keeps every integer exact. Digit runs inside
strings or long fractions only cost that slower path, never a wrong value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Final, NoReturn

import orjson

_LONG_DIGIT_RUN: Final = re.compile(rb"[0-9]{19}")


def _reject_constant(name: str) -> NoReturn:
    # The standard library accepts NaN and Infinity, which are not JSON; orjson refuses them.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # The standard library reads 1e400 as inf, which orjson would then write as null.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range for a double")
    return value


def needs_exact_path(raw: bytes) -> bool:
    """Whether `raw` might hold an integer that orjson would round."""
    return _LONG_DIGIT_RUN.search(raw) is not None


def loads(raw: bytes) -> object:
    """Parse JSON, exact for every number. Raises ValueError on anything but valid UTF-8 JSON."""
    if not needs_exact_path(raw):
        return orjson.loads(raw)
    # Decoding ourselves: json.loads would also guess UTF-16/32, which orjson never accepts.
    return json.loads(
        raw.decode("utf-8"), parse_float=_finite_float, parse_constant=_reject_constant
    )


def dumps(value: object) -> bytes:
    """Serialize compactly, in insertion order. Raises ValueError/TypeError if not JSON-able."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        # Most likely an integer beyond 64 bits that loads() kept exact; anything else
        # fails again below with the standard library's own message.
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8")
