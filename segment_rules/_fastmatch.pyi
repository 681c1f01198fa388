# Types of the C extension segment_rules/_fastmatch.c (see segment_rules/fast_match.py).
from collections.abc import Callable, Mapping
from typing import Any

class Matcher:
    def __init__(
        self,
        branches: tuple[Any, ...],
        branch_of: dict[str, int],
        default_branch: int,
        fallback: Callable[[Mapping[str, Any]], tuple[str, ...]],
        limit: int = ...,
    ) -> None: ...
    def __call__(self, event: Mapping[str, Any]) -> tuple[str, ...]: ...
    def stats(self) -> dict[str, int]: ...
