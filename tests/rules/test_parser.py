from __future__ import annotations

from pathlib import Path

import pytest

from segment_rules import RuleFileError, load_rules_file, parse_rules
from segment_rules.model import All, CountWithin, FieldTest, SegmentRef

EXAMPLES = Path(__file__).resolve().parents[2] / "segment_rules" / "examples" / "segments.yaml"


def errors_of(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        parse_rules(text, "r.yaml")
    return [str(e) for e in info.value.errors]


def test_example_file_parses() -> None:
    rs = load_rules_file(EXAMPLES)
    assert [s.id for s in rs.segments] == ["auto_new_car_intent", "geo_socal", "new_car_socal"]
    intent = rs.segment("auto_new_car_intent")
    assert intent.iab_ids == (806,)
    assert intent.ttl == 14 * 86400
    assert isinstance(intent.rule, CountWithin)
    assert intent.rule.at_least == 2
    assert intent.rule.within == 14 * 86400
    geo = rs.segment("geo_socal")
    assert isinstance(geo.rule, CountWithin)
    assert isinstance(geo.rule.where, All)
    metro = geo.rule.where.parts[2]
    assert metro == FieldTest(("geo", "metro"), "in", frozenset({"803", "825", "804"}))
    both = rs.segment("new_car_socal")
    assert isinstance(both.of, All)
    assert [p.segment_id for p in both.of.parts if isinstance(p, SegmentRef)] == [
        "auto_new_car_intent",
        "geo_socal",
    ]
    assert len(rs.version) == 64


def test_yaml_syntax_error_has_line() -> None:
    text = "segments:\n  - id: a\n    rule: {at_least: 1\n"
    (msg,) = errors_of(text)
    assert msg.startswith("r.yaml:4:1: YAML syntax error")


def test_unknown_field_names_line_and_known_fields() -> None:
    text = """segments:
  - id: a
    rule:
      within: 1d
      where:
        field: geo.metr0
        equals: "803"
"""
    (msg,) = errors_of(text)
    assert msg.startswith("r.yaml:6:16: unknown field 'geo.metr0'; known fields: uid, type")


def test_unknown_key_in_segment() -> None:
    text = """segments:
  - id: a
    tll: 3d
    rule: {within: 1d, where: {field: type, equals: click}}
"""
    (msg,) = errors_of(text)
    assert msg == (
        "r.yaml:3:5: unknown key 'tll' in a segment; allowed: id, name, description, owner, "
        "iab_ids, ttl, status, partners, rule, of"
    )


def test_missing_reference() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: b
    of: {and: [a, nope]}
"""
    (msg,) = errors_of(text)
    assert msg == "r.yaml:5:19: segment 'b' refers to 'nope', which is not defined in this file"


def test_reference_cycle() -> None:
    text = """segments:
  - id: base
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: x
    of: {and: [base, y]}
  - id: y
    of: {or: [x]}
"""
    msgs = errors_of(text)
    assert msgs == [
        "r.yaml:7:15: segments refer to each other in a cycle: x -> y -> x; break the loop"
    ]


def test_duplicate_ids_and_keys() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
"""
    (msg,) = errors_of(text)
    assert msg.startswith("r.yaml:4:5: duplicate segment id 'a' (first defined at line 2)")
    text = "segments:\n  - id: a\n    id: b\n"
    (msg,) = errors_of(text)
    assert msg.startswith("r.yaml:3:5: duplicate key 'id' (first at line 2)")


def test_wrong_types_and_durations() -> None:
    text = """segments:
  - id: a
    ttl: forever
    rule: {at_least: two, within: 1d, where: {field: type, equals: click}}
"""
    msgs = errors_of(text)
    assert msgs[0].startswith("r.yaml:3:10: 'forever' is not a duration")
    assert len(msgs) == 1  # the segment is skipped after its first error


def test_ttl_over_maximum() -> None:
    text = """max_ttl: 30d
segments:
  - id: a
    ttl: 31d
    rule: {within: 1d, where: {field: type, equals: click}}
"""
    (msg,) = errors_of(text)
    assert msg == "r.yaml:4:10: ttl 31d is over the maximum of 30d; shorten it"


def test_all_errors_reported_at_once() -> None:
    text = """segments:
  - id: A
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: b
    rule: {within: 1d, where: {field: nope, equals: click}}
"""
    msgs = errors_of(text)
    assert [m.split(":")[1] for m in msgs] == ["2", "5"]


def test_composite_of_only_not_is_refused() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: b
    of: {not: a}
"""
    (msg,) = errors_of(text)
    assert "would hold every cookie in none of its parts" in msg


def test_unquoted_metro_codes_become_text() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {field: geo.metro, in: [803, 825]}}
"""
    rs = parse_rules(text)
    rule = rs.segment("a").rule
    assert isinstance(rule, CountWithin)
    assert rule.where == FieldTest(("geo", "metro"), "in", frozenset({"803", "825"}))
