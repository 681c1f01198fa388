# Types of the C extension segment_rules/_kernel.c (see segment_rules/compiler.py).
from collections.abc import Sequence
from typing import Any

class Kernel:
    def __init__(
        self,
        traits: tuple[tuple[str, int, int, float, tuple[int, ...]], ...],
        tests: dict[str, tuple[tuple[tuple[int, float, float], ...], bool]],
        checks: tuple[tuple[str, tuple[Any, ...], tuple[Any, ...] | None], ...],
    ) -> None: ...
    def record(
        self, history: dict[str, list[Any]], ts: float, tests: Sequence[str], now: float
    ) -> bool: ...
    def prune(self, history: dict[str, list[Any]], now: float) -> None: ...
    def evaluate(
        self, history: dict[str, list[Any]], now: float
    ) -> tuple[list[str], float | None]: ...
