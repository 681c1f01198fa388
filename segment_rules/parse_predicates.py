"""Parsing ``where:`` event tests: ``field: <path>`` and one operator."""

from __future__ import annotations

import re
from typing import get_args

from segment_rules.fields import field_kind, known_field_names
from segment_rules.model import FieldOp, FieldTest, FieldValue, Predicate, Scalar
from segment_rules.parse_base import ParseBase
from segment_rules.patterns import check_pattern
from segment_rules.yaml_source import YNode

# Derived from the type, so the parser and the model cannot disagree.
FIELD_OPS: tuple[FieldOp, ...] = get_args(FieldOp)
TEXT_OPS = ("prefix", "suffix", "contains", "under")
NUMBER_OPS = ("gt", "gte", "lt", "lte")
HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class PredicateParser(ParseBase):
    def predicate(self, node: YNode) -> Predicate:
        return self.boolean(node, self.field_test, "event tests")

    def field_test(self, node: YNode) -> FieldTest:
        if not node.is_mapping or "field" not in node.value:
            raise self.fail(
                node.loc,
                "an event test is 'field: <name>' with one operator such as equals, in, prefix, "
                "regex, gte, exists, under, host; or all/any/not of tests",
            )
        self.unknown_keys(node, ("field", *FIELD_OPS), "an event test")
        field_node = node.value["field"]
        if not isinstance(field_node.value, str) or not field_node.value:
            raise self.fail(field_node.loc, "'field' must be a field name such as 'geo.metro'")
        path = tuple(field_node.value.split("."))
        kind = field_kind(path)
        if kind is None:
            raise self.fail(
                field_node.loc,
                f"unknown field '{field_node.value}'; known fields: {known_field_names()}",
            )
        ops = [op for op in FIELD_OPS if op in node.value]
        if len(ops) != 1:
            raise self.fail(
                node.loc,
                f"give exactly one operator for field '{field_node.value}', one of: "
                f"{', '.join(FIELD_OPS)}",
            )
        op = ops[0]
        value_node = node.value[op]
        name = field_node.value
        if op in ("in", "not_in"):
            if not value_node.is_sequence or not value_node.value:
                raise self.fail(value_node.loc, f"'{op}' takes a non-empty list of values")
            values = frozenset(self.scalar(v, kind) for v in value_node.value)
            return FieldTest(path, op, values)
        if op in ("equals", "not_equals"):
            return FieldTest(path, op, self.scalar(value_node, kind))
        if op in ("exists", "missing"):
            if not isinstance(value_node.value, bool):
                raise self.fail(value_node.loc, f"'{op}' takes true or false")
            present = value_node.value == (op == "exists")
            return FieldTest(path, "exists" if present else "missing", None)
        if op in NUMBER_OPS or op == "between":
            if kind != "any":
                raise self.fail(
                    value_node.loc,
                    f"field '{name}' holds text; '{op}' compares numbers, use it on attrs.<name>",
                )
            if op == "between":
                return FieldTest(path, "between", self._range(value_node))
            return FieldTest(path, op, self.number(value_node, op))
        text = self._text_value(value_node, op)
        if op == "regex":
            problem = check_pattern(text)
            if problem is not None:
                raise self.fail(value_node.loc, problem)
        elif op == "under":
            text = text.strip("/")
            if not text:
                raise self.fail(value_node.loc, "'under' takes a category path such as 'auto'")
        elif op == "under_iab":
            return self._under_iab(path, value_node)
        elif op in ("host", "host_suffix"):
            text = text.lower().removeprefix("*.").rstrip(".")
            if not HOST.match(text):
                raise self.fail(
                    value_node.loc,
                    f"'{op}' takes a bare host name such as 'cars.example', got {value_node.value!r}",
                )
        elif op == "path_prefix" and (not text.startswith("/") or "?" in text or "#" in text):
            raise self.fail(
                value_node.loc,
                f"'path_prefix' is a path such as '/models/' (no query or fragment), got {text!r}",
            )
        return FieldTest(path, op, text)

    def _text_value(self, node: YNode, op: str) -> str:
        value = node.value
        if op == "under_iab":
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise self.fail(node.loc, f"'{op}' takes non-empty text, got {node.plain()!r}")
        return str(value)

    def _range(self, node: YNode) -> tuple[float, float]:
        if not node.is_sequence or len(node.value) != 2:
            raise self.fail(node.loc, "'between' takes [low, high], e.g. [100, 500]")
        low, high = (self.number(v, "between") for v in node.value)
        if low > high:
            raise self.fail(node.loc, f"'between' needs low <= high, got [{low:g}, {high:g}]")
        return (low, high)

    def _under_iab(self, path: tuple[str, ...], node: YNode) -> FieldTest:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.fail(
                node.loc, f"'under_iab' takes an IAB Audience Taxonomy id, got {node.plain()!r}"
            )
        if self.taxonomy is None:
            raise self.fail(
                node.loc,
                "'under_iab' needs the IAB Audience Taxonomy: load the rules with a taxonomy "
                "file (the IAB Audience Taxonomy 1.1 TSV)",
            )
        if value not in self.taxonomy:
            raise self.fail(node.loc, f"{value} is not an IAB Audience Taxonomy id; check the id")
        ids = frozenset(str(i) for i in self.taxonomy.descendants(value))
        return FieldTest(path, "under_iab", value, ids)

    def scalar(self, node: YNode, kind: str) -> Scalar:
        value = node.value
        if kind in ("str", "list"):
            # Codes such as metro 803 are text in events (OpenRTB); accept them unquoted.
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise self.fail(node.loc, f"expected text, got {node.plain()!r}")
            return str(value)
        if not isinstance(value, str | int | float | bool):
            raise self.fail(node.loc, f"expected a single value, got {node.plain()!r}")
        return value


def describe_value(value: FieldValue) -> str:
    if isinstance(value, frozenset):
        return "[" + ", ".join(sorted(repr(v) for v in value)) + "]"
    return repr(value)
