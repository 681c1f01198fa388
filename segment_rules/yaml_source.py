"""YAML parsed into nodes that remember their line and column.

PyYAML's plain ``safe_load`` forgets positions and silently keeps the last of
duplicate keys; ad ops need both reported, so we walk the composed node graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from segment_rules.errors import RuleError, RuleFileError


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    column: int

    def error(self, message: str) -> RuleError:
        return RuleError(self.file, self.line, self.column, message)


@dataclass
class YNode:
    """A located YAML value: a scalar, a list of nodes or a str-keyed mapping of nodes."""

    loc: Loc
    value: Any
    key_locs: dict[str, Loc] = field(default_factory=dict)

    @property
    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    @property
    def is_sequence(self) -> bool:
        return isinstance(self.value, list)

    def plain(self) -> Any:
        """The value with all positions stripped."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def _loc(file: str, node: yaml.Node) -> Loc:
    return Loc(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _convert(file: str, node: yaml.Node, constructor: yaml.SafeLoader) -> YNode:
    loc = _loc(file, node)
    if isinstance(node, yaml.MappingNode):
        items: dict[str, YNode] = {}
        key_locs: dict[str, Loc] = {}
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            key_loc = _loc(file, key_node)
            if not isinstance(key, str):
                raise RuleFileError([key_loc.error(f"keys must be text, got {key!r}")])
            if key in items:
                first = key_locs[key]
                raise RuleFileError(
                    [key_loc.error(f"duplicate key '{key}' (first at line {first.line}); keep one")]
                )
            items[key] = _convert(file, value_node, constructor)
            key_locs[key] = key_loc
        return YNode(loc, items, key_locs)
    if isinstance(node, yaml.SequenceNode):
        return YNode(loc, [_convert(file, child, constructor) for child in node.value])
    return YNode(loc, constructor.construct_object(node, deep=True))


def parse_yaml(text: str, file: str) -> YNode:
    """Parse one YAML document into located nodes, or raise RuleFileError with the position."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        column = mark.column + 1 if mark else 1
        reason = exc.problem or exc.context or "invalid YAML"
        raise RuleFileError(
            [RuleError(file, line, column, f"YAML syntax error: {reason}")]
        ) from None
    except yaml.YAMLError as exc:
        raise RuleFileError([RuleError(file, 1, 1, f"YAML error: {exc}")]) from None
    if node is None:
        raise RuleFileError([RuleError(file, 1, 1, "the file is empty; expected 'segments:'")])
    constructor = yaml.SafeLoader("")
    try:
        return _convert(file, node, constructor)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark else 1
        column = mark.column + 1 if mark else 1
        raise RuleFileError([RuleError(file, line, column, f"YAML error: {exc.problem}")]) from None
