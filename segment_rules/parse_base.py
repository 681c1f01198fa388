"""What every part of the rule parser shares: error recording, scalars, the boolean forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from segment_rules.durations import format_duration, parse_duration
from segment_rules.errors import RuleError
from segment_rules.model import DEFAULT_RETENTION, All, AnyOf, Not
from segment_rules.taxonomy import Taxonomy
from segment_rules.yaml_source import Loc, YNode

L = TypeVar("L")


class Invalid(Exception):
    """Raised inside the walk after an error has been recorded, to skip the broken part."""


class ParseBase:
    def __init__(self, file: str, taxonomy: Taxonomy | None = None) -> None:
        self.file = file
        self.taxonomy = taxonomy
        self.errors: list[RuleError] = []
        self.retention = DEFAULT_RETENTION

    def fail(self, loc: Loc, message: str) -> Invalid:
        self.errors.append(loc.error(message))
        return Invalid()

    def unknown_keys(self, node: YNode, allowed: tuple[str, ...], where: str) -> None:
        for key, loc in node.key_locs.items():
            if key not in allowed:
                self.fail(loc, f"unknown key '{key}' in {where}; allowed: {', '.join(allowed)}")

    def text(self, node: YNode | None, default: str) -> str:
        if node is None:
            return default
        if not isinstance(node.value, str):
            raise self.fail(node.loc, f"expected text, got {node.plain()!r}")
        return node.value

    def duration(self, node: YNode) -> float:
        try:
            return parse_duration(node.value)
        except ValueError as exc:
            raise self.fail(node.loc, str(exc)) from None

    def window(self, node: YNode, what: str = "window") -> float:
        """A duration that must fit in the retention (older events are not kept)."""
        seconds = self.duration(node)
        if seconds > self.retention:
            raise self.fail(
                node.loc,
                f"{what} {node.value} is beyond the retention of {format_duration(self.retention)}; "
                "events that old are not kept: shorten it or raise 'retention:' at the top",
            )
        return seconds

    def number(self, node: YNode, what: str, *, positive: bool = False) -> float:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(node.loc, f"'{what}' must be a number, got {node.plain()!r}")
        if positive and value <= 0:
            raise self.fail(node.loc, f"'{what}' must be more than zero, got {value!r}")
        return float(value)

    def count(self, node: YNode, what: str, *, minimum: int, maximum: int) -> int:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.fail(
                node.loc,
                f"'{what}' must be a whole number of events from {minimum} to {maximum}, got {node.plain()!r}",
            )
        return value

    def boolean(
        self, node: YNode, leaf: Callable[[YNode], L], what: str
    ) -> L | All[L] | AnyOf[L] | Not[L]:
        if node.is_mapping and len(node.value) == 1:
            ((key, child),) = node.value.items()
            if key in ("all", "any", "and", "or"):
                if not child.is_sequence or not child.value:
                    raise self.fail(child.loc, f"'{key}' takes a non-empty list of {what}")
                parts = tuple(self.boolean(c, leaf, what) for c in child.value)
                return All(parts) if key in ("all", "and") else AnyOf(parts)
            if key == "not":
                return Not(self.boolean(child, leaf, what))
        return leaf(node)
