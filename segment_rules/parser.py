"""Rule file text -> validated RuleSet, or every problem with file:line:column."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

from segment_rules.checks import check_rules, rule_warnings
from segment_rules.durations import format_duration
from segment_rules.errors import RuleError, RuleFileError
from segment_rules.graph import check_composites
from segment_rules.model import (
    DEFAULT_MAX_TTL,
    Composite,
    RuleSet,
    Segment,
    SegmentRef,
    Status,
)
from segment_rules.parse_base import Invalid
from segment_rules.parse_conditions import ConditionParser
from segment_rules.taxonomy import Taxonomy
from segment_rules.yaml_source import Loc, YNode, parse_yaml

SEGMENT_ID = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
PARTNER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SEGMENT_KEYS = (
    "id",
    "name",
    "description",
    "owner",
    "iab_ids",
    "ttl",
    "status",
    "partners",
    "rule",
    "of",
)
TOP_KEYS = ("version", "retention", "max_ttl", "segments")


def load_rules_file(path: str | Path, taxonomy: Taxonomy | None = None) -> RuleSet:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([RuleError(str(p), 1, 1, f"cannot read the file: {exc}")]) from None
    return parse_rules(text, str(p), taxonomy)


def parse_rules(text: str, file: str = "<rules>", taxonomy: Taxonomy | None = None) -> RuleSet:
    """Validate a whole rule file. With ``taxonomy``, IAB ids are checked and ``under_iab``
    tests are allowed; without it, ids are only checked to be positive whole numbers."""
    root = parse_yaml(text, file)
    parser = _Parser(file, taxonomy)
    segments = parser.document(root)
    if not parser.errors:
        parser.errors.extend(check_rules(segments))
    if parser.errors:
        raise RuleFileError(sorted(parser.errors, key=lambda e: (e.line, e.column)))
    version = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return RuleSet(
        file=file,
        version=version,
        segments=tuple(segments),
        retention=parser.retention,
        max_ttl=parser.max_ttl,
        warnings=tuple(rule_warnings(segments)),
    )


class _Parser(ConditionParser):
    def __init__(self, file: str, taxonomy: Taxonomy | None) -> None:
        super().__init__(file, taxonomy)
        self.max_ttl = DEFAULT_MAX_TTL
        self._partner_ids: dict[tuple[str, str], tuple[str, Loc]] = {}

    # -- document -------------------------------------------------------------------------
    def document(self, root: YNode) -> list[Segment]:
        if not root.is_mapping:
            self.fail(root.loc, "the file must be a mapping with a 'segments:' list")
            return []
        self.unknown_keys(root, TOP_KEYS, "the top level")
        version = root.value.get("version")
        if version is not None and version.value != 1:
            self.fail(version.loc, f"unsupported rules version {version.value!r}; this DMP reads 1")
        if "max_ttl" in root.value:
            with contextlib.suppress(Invalid):  # recorded; keep checking the rest
                self.max_ttl = self.duration(root.value["max_ttl"])
        if "retention" in root.value:
            with contextlib.suppress(Invalid):
                self.retention = self.duration(root.value["retention"])
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
                seg = self.segment(item)
            except Invalid:
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

    def segment(self, node: YNode) -> Segment:
        if not node.is_mapping:
            raise self.fail(
                node.loc, "each segment must be a mapping with at least 'id' and 'rule' or 'of'"
            )
        self.unknown_keys(node, SEGMENT_KEYS, "a segment")
        values = node.value
        if "id" not in values:
            raise self.fail(node.loc, "the segment has no 'id'; add e.g. 'id: auto_new_car_intent'")
        seg_id = values["id"].value
        if not isinstance(seg_id, str) or not SEGMENT_ID.match(seg_id):
            raise self.fail(
                values["id"].loc,
                f"segment id {seg_id!r} must be lower-case letters, digits and '_', starting with a letter",
            )
        name = self.text(values.get("name"), seg_id)
        description = self.text(values.get("description"), "")
        owner = self.text(values.get("owner"), "")
        iab_ids = self._iab_ids(values.get("iab_ids"))
        ttl = self._ttl(values.get("ttl"))
        status = self._status(values.get("status"))
        has_rule, has_of = "rule" in values, "of" in values
        if has_rule == has_of:
            raise self.fail(
                node.loc,
                f"segment '{seg_id}' needs exactly one of 'rule:' (from events) or 'of:' (from other segments)",
            )
        rule = self.condition(values["rule"]) if has_rule else None
        of = self.composite(values["of"]) if has_of else None
        partners = self._partners(values.get("partners"), seg_id)
        return Segment(
            seg_id, name, description, owner, iab_ids, ttl, status, rule, of, node.loc, partners
        )

    # -- metadata -------------------------------------------------------------------------
    def _ttl(self, node: YNode | None) -> float | None:
        if node is None:
            return None
        ttl = self.duration(node)
        if ttl > self.max_ttl:
            raise self.fail(
                node.loc,
                f"ttl {node.value} is over the maximum of {self.max_ttl / 86400:g}d; shorten it",
            )
        if ttl > self.retention:
            raise self.fail(
                node.loc,
                f"ttl {node.value} is beyond the retention of {format_duration(self.retention)}; "
                "the events that prove membership are forgotten by then: shorten it or raise "
                "'retention:' at the top",
            )
        return ttl

    def _status(self, node: YNode | None) -> Status:
        if node is None:
            return "active"
        if node.value == "active":
            return "active"
        if node.value == "paused":
            return "paused"
        raise self.fail(node.loc, f"status must be 'active' or 'paused', got {node.plain()!r}")

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
                    item.loc,
                    f"IAB Audience Taxonomy ids are positive integers, got {item.plain()!r}",
                )
            if self.taxonomy is not None and item.value not in self.taxonomy:
                raise self.fail(
                    item.loc,
                    f"{item.value} is not an IAB Audience Taxonomy 1.1 id; check the id "
                    "(names and ids are in the taxonomy file)",
                )
            ids.append(item.value)
        return tuple(ids)

    def _partners(self, node: YNode | None, seg_id: str) -> tuple[tuple[str, str], ...]:
        if node is None:
            return ()
        if not node.is_mapping:
            raise self.fail(
                node.loc, "'partners' maps partner ids to their segment ids, e.g. {dsp_a: '123'}"
            )
        pairs: list[tuple[str, str]] = []
        for partner, value_node in node.value.items():
            key_loc = node.key_locs[partner]
            if not PARTNER_ID.match(partner):
                raise self.fail(
                    key_loc,
                    f"partner id {partner!r} must be letters, digits, '_', '.' or '-'",
                )
            value = value_node.value
            if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
                raise self.fail(
                    value_node.loc,
                    f"the segment id for partner '{partner}' must be text or a number, "
                    f"got {value_node.plain()!r}",
                )
            theirs = str(value)
            if len(theirs) > 128:
                raise self.fail(value_node.loc, "a partner segment id is at most 128 characters")
            first = self._partner_ids.get((partner, theirs))
            if first is not None:
                raise self.fail(
                    value_node.loc,
                    f"partner '{partner}' id '{theirs}' is already used by segment '{first[0]}' "
                    f"(line {first[1].line}); each partner id must name one segment",
                )
            self._partner_ids[(partner, theirs)] = (seg_id, value_node.loc)
            pairs.append((partner, theirs))
        return tuple(pairs)

    def composite(self, node: YNode) -> Composite:
        return self.boolean(node, self._segment_ref, "segment ids")

    def _segment_ref(self, node: YNode) -> SegmentRef:
        if not isinstance(node.value, str):
            raise self.fail(node.loc, "expected a segment id, or and/or/not of segment ids")
        return SegmentRef(node.value, node.loc)
