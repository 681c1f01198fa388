"""Rule file text -> validated RuleSet, or every problem with file:line:column."""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from segment_rules.durations import parse_duration
from segment_rules.errors import RuleError, RuleFileError
from segment_rules.fields import field_kind, known_field_names
from segment_rules.graph import check_composites
from segment_rules.model import (
    All,
    AnyOf,
    Composite,
    Condition,
    CountWithin,
    FieldTest,
    Not,
    Predicate,
    RuleSet,
    Segment,
    SegmentRef,
    Status,
)
from segment_rules.yaml_source import Loc, YNode, parse_yaml

SEGMENT_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SEGMENT_KEYS = ("id", "name", "description", "owner", "iab_ids", "ttl", "status", "rule", "of")
TOP_KEYS = ("version", "max_ttl", "segments")
FIELD_OPS = ("equals", "in", "prefix")
DEFAULT_MAX_TTL = 400 * 86400.0
L = TypeVar("L")


class _Invalid(Exception):
    """Raised inside the walk after an error has been recorded, to skip the broken part."""


def load_rules_file(path: str | Path) -> RuleSet:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([RuleError(str(p), 1, 1, f"cannot read the file: {exc}")]) from None
    return parse_rules(text, str(p))


def parse_rules(text: str, file: str = "<rules>") -> RuleSet:
    root = parse_yaml(text, file)
    parser = _Parser(file)
    segments = parser.document(root)
    if parser.errors:
        raise RuleFileError(sorted(parser.errors, key=lambda e: (e.line, e.column)))
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return RuleSet(file=file, version=version, segments=tuple(segments))


class _Parser:
    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[RuleError] = []

    def fail(self, loc: Loc, message: str) -> _Invalid:
        self.errors.append(loc.error(message))
        return _Invalid()

    # -- document -------------------------------------------------------------------------
    def document(self, root: YNode) -> list[Segment]:
        if not root.is_mapping:
            self.fail(root.loc, "the file must be a mapping with a 'segments:' list")
            return []
        self._unknown_keys(root, TOP_KEYS, "the top level")
        version = root.value.get("version")
        if version is not None and version.value != 1:
            self.fail(version.loc, f"unsupported rules version {version.value!r}; this DMP reads 1")
        max_ttl = DEFAULT_MAX_TTL
        if "max_ttl" in root.value:
            with contextlib.suppress(_Invalid):  # recorded; keep checking the rest
                max_ttl = self._duration(root.value["max_ttl"])
        seg_list = root.value.get("segments")
        if seg_list is None:
            self.fail(root.loc, "missing 'segments:'; list the segments under it")
            return []
        if not seg_list.is_sequence:
            self.fail(seg_list.loc, "'segments' must be a list ('- id: ...' entries)")
            return []
        segments: list[Segment] = []
        seen: dict[str, Loc] = {}
        for item in seg_list.value:
            try:
                seg = self.segment(item, max_ttl)
            except _Invalid:
                continue
            if seg.id in seen:
                self.fail(
                    seg.loc,
                    f"duplicate segment id '{seg.id}' (first defined at line {seen[seg.id].line}); "
                    "segment ids must be unique",
                )
                continue
            seen[seg.id] = seg.loc
            segments.append(seg)
        self.errors.extend(check_composites(segments))
        return segments

    def segment(self, node: YNode, max_ttl: float) -> Segment:
        if not node.is_mapping:
            raise self.fail(
                node.loc, "each segment must be a mapping with at least 'id' and 'rule' or 'of'"
            )
        self._unknown_keys(node, SEGMENT_KEYS, "a segment")
        values = node.value
        if "id" not in values:
            raise self.fail(node.loc, "the segment has no 'id'; add e.g. 'id: auto_new_car_intent'")
        seg_id = values["id"].value
        if not isinstance(seg_id, str) or not SEGMENT_ID.match(seg_id):
            raise self.fail(
                values["id"].loc,
                f"segment id {seg_id!r} must be lower-case letters, digits and '_', starting with a letter",
            )
        name = self._text(values.get("name"), seg_id)
        description = self._text(values.get("description"), "")
        owner = self._text(values.get("owner"), "")
        iab_ids = self._iab_ids(values.get("iab_ids"))
        ttl = self._ttl(values.get("ttl"), max_ttl)
        status = self._status(values.get("status"))
        has_rule, has_of = "rule" in values, "of" in values
        if has_rule == has_of:
            raise self.fail(
                node.loc,
                f"segment '{seg_id}' needs exactly one of 'rule:' (from events) or 'of:' (from other segments)",
            )
        rule = self.condition(values["rule"]) if has_rule else None
        of = self.composite(values["of"]) if has_of else None
        return Segment(seg_id, name, description, owner, iab_ids, ttl, status, rule, of, node.loc)

    # -- scalars --------------------------------------------------------------------------
    def _unknown_keys(self, node: YNode, allowed: tuple[str, ...], where: str) -> None:
        for key, loc in node.key_locs.items():
            if key not in allowed:
                self.fail(loc, f"unknown key '{key}' in {where}; allowed: {', '.join(allowed)}")

    def _text(self, node: YNode | None, default: str) -> str:
        if node is None:
            return default
        if not isinstance(node.value, str):
            raise self.fail(node.loc, f"expected text, got {node.value!r}")
        return node.value

    def _duration(self, node: YNode) -> float:
        try:
            return parse_duration(node.value)
        except ValueError as exc:
            raise self.fail(node.loc, str(exc)) from None

    def _ttl(self, node: YNode | None, max_ttl: float) -> float | None:
        if node is None:
            return None
        ttl = self._duration(node)
        if ttl > max_ttl:
            raise self.fail(
                node.loc,
                f"ttl {node.value} is over the maximum of {max_ttl / 86400:g}d; shorten it",
            )
        return ttl

    def _status(self, node: YNode | None) -> Status:
        if node is None:
            return "active"
        if node.value == "active":
            return "active"
        if node.value == "paused":
            return "paused"
        raise self.fail(node.loc, f"status must be 'active' or 'paused', got {node.value!r}")

    def _iab_ids(self, node: YNode | None) -> tuple[int, ...]:
        if node is None:
            return ()
        if not node.is_sequence:
            raise self.fail(
                node.loc, "iab_ids must be a list of IAB Audience Taxonomy ids, e.g. [806]"
            )
        ids: list[int] = []
        for item in node.value:
            if isinstance(item.value, bool) or not isinstance(item.value, int) or item.value <= 0:
                raise self.fail(
                    item.loc, f"IAB Audience Taxonomy ids are positive integers, got {item.value!r}"
                )
            ids.append(item.value)
        return tuple(ids)

    # -- the three boolean languages ----------------------------------------------------------
    def _boolean(
        self, node: YNode, leaf: Callable[[YNode], L], what: str
    ) -> L | All[L] | AnyOf[L] | Not[L]:
        if node.is_mapping and len(node.value) == 1:
            ((key, child),) = node.value.items()
            if key in ("all", "any", "and", "or"):
                if not child.is_sequence or not child.value:
                    raise self.fail(child.loc, f"'{key}' takes a non-empty list of {what}")
                parts = tuple(self._boolean(c, leaf, what) for c in child.value)
                return All(parts) if key in ("all", "and") else AnyOf(parts)
            if key == "not":
                return Not(self._boolean(child, leaf, what))
        return leaf(node)

    def condition(self, node: YNode) -> Condition:
        return self._boolean(node, self._count, "conditions")

    def predicate(self, node: YNode) -> Predicate:
        return self._boolean(node, self._field_test, "event tests")

    def composite(self, node: YNode) -> Composite:
        return self._boolean(node, self._segment_ref, "segment ids")

    # -- leaves -------------------------------------------------------------------------------
    def _count(self, node: YNode) -> CountWithin:
        if not node.is_mapping or "where" not in node.value:
            raise self.fail(
                node.loc,
                "a rule is 'at_least: N', 'within: <duration>' and 'where: <event test>', "
                "or all/any/not of such rules",
            )
        self._unknown_keys(node, ("at_least", "within", "where"), "a rule")
        at_least_node = node.value.get("at_least")
        at_least = 1 if at_least_node is None else at_least_node.value
        if isinstance(at_least, bool) or not isinstance(at_least, int) or at_least < 1:
            loc = at_least_node.loc if at_least_node else node.loc
            raise self.fail(
                loc, f"'at_least' must be a whole number of events, 1 or more, got {at_least!r}"
            )
        if "within" not in node.value:
            raise self.fail(node.loc, "a rule needs 'within: <duration>', e.g. 'within: 14d'")
        within = self._duration(node.value["within"])
        return CountWithin(at_least, within, self.predicate(node.value["where"]))

    def _field_test(self, node: YNode) -> FieldTest:
        if not node.is_mapping or "field" not in node.value:
            raise self.fail(
                node.loc,
                "an event test is 'field: <name>' with one of equals/in/prefix, or all/any/not of tests",
            )
        self._unknown_keys(node, ("field", *FIELD_OPS), "an event test")
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
                f"give exactly one of {', '.join(FIELD_OPS)} for field '{field_node.value}'",
            )
        op = ops[0]
        value_node = node.value[op]
        if op == "in":
            if not value_node.is_sequence or not value_node.value:
                raise self.fail(value_node.loc, "'in' takes a non-empty list of values")
            values = frozenset(self._scalar(v, kind) for v in value_node.value)
            return FieldTest(path, "in", values)
        value = self._scalar(value_node, kind)
        if op == "prefix":
            if not isinstance(value, str):
                raise self.fail(value_node.loc, f"'prefix' takes text, got {value_node.value!r}")
            return FieldTest(path, "prefix", value)
        return FieldTest(path, "equals", value)

    def _scalar(self, node: YNode, kind: str) -> str | int | float | bool:
        value = node.value
        if kind in ("str", "list"):
            # Codes such as metro 803 are text in events (OpenRTB); accept them unquoted.
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise self.fail(node.loc, f"expected text, got {value!r}")
            return str(value)
        if not isinstance(value, str | int | float | bool):
            raise self.fail(node.loc, f"expected a single value, got {value!r}")
        return value

    def _segment_ref(self, node: YNode) -> SegmentRef:
        if not isinstance(node.value, str):
            raise self.fail(node.loc, "expected a segment id, or and/or/not of segment ids")
        return SegmentRef(node.value, node.loc)
