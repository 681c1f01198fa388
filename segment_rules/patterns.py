"""Regular expressions that cannot blow up: RE2, which matches in time linear in the text.

RE2 has no backreferences or lookaround, so a pattern using them is refused when the rule
file loads, with a hint; so is a pattern whose compiled program is unreasonably large.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import re2

MAX_PROGRAM_SIZE = 2000  # RE2 program instructions; `a{1000}` is about 1000
_HINTS = (
    ("\\1", "backreferences (\\1) are not supported; match the text itself"),
    ("(?=", "lookahead (?=...) is not supported; test the parts with 'all:'"),
    ("(?!", "negative lookahead (?!...) is not supported; use 'not:' with a second test"),
    ("(?<", "lookbehind (?<...) and named groups (?<name>) are not supported"),
)


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # the refusal goes to the rule file's error, not stderr
    options.never_capture = True
    return options


def check_pattern(pattern: str) -> str | None:
    """None when ``pattern`` is usable, else the reason and the fix."""
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        for marker, hint in _HINTS:
            if marker in pattern:
                return f"regex {pattern!r} is refused: {hint}"
        return f"regex {pattern!r} is invalid ({reason}); fix the pattern"
    if compiled.programsize > MAX_PROGRAM_SIZE:
        return (
            f"regex {pattern!r} is too large ({compiled.programsize} steps, at most "
            f"{MAX_PROGRAM_SIZE}); use shorter repetitions or several tests"
        )
    return None


@lru_cache(maxsize=4096)
def searcher(pattern: str) -> Callable[[str], bool]:
    """A function: does ``pattern`` occur in the text (anywhere unless anchored)."""
    search = re2.compile(pattern, _options()).search

    def found(text: str) -> bool:
        return search(text) is not None

    return found
