from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from segment_rules import CompiledRules, History, load_rules_file, parse_rules

EXAMPLES = Path(__file__).resolve().parents[2] / "segment_rules" / "examples" / "segments.yaml"
DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.fixture
def rules() -> CompiledRules:
    return CompiledRules(load_rules_file(EXAMPLES))


def new_car_view(metro: str = "803", region: str = "CA") -> dict[str, Any]:
    return {
        "type": "page_view",
        "categories": ["news", "auto/new-cars/suv"],
        "geo": {"country": "USA", "region": region, "metro": metro},
    }


def feed(
    rules: CompiledRules, history: History, events: list[tuple[float, dict[str, Any]]]
) -> None:
    for ts, event in events:
        rules.record(history, ts, rules.matching_traits(event), NOW)


def test_two_views_in_socal_qualify_for_all_three(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - 3 * DAY, new_car_view()), (NOW - DAY, new_car_view("825"))])
    ev = rules.evaluate(h, NOW)
    assert ev.members == {"auto_new_car_intent", "geo_socal"}
    assert rules.with_composites(ev.members) == [
        "auto_new_car_intent",
        "geo_socal",
        "new_car_socal",
    ]
    # The first view leaves the 14-day window first; that is when membership may change.
    assert ev.next_change == NOW - 3 * DAY + 14 * DAY


def test_one_view_is_not_enough(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - DAY, new_car_view())])
    assert rules.evaluate(h, NOW).members == {"geo_socal"}


def test_old_la_view_is_expired(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - 40 * DAY, new_car_view())])
    assert rules.evaluate(h, NOW).members == frozenset()
    assert h == {}  # too old to keep


def test_other_metro_is_not_socal(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - DAY, new_car_view("807")), (NOW - 2 * DAY, new_car_view("807"))])
    assert rules.evaluate(h, NOW).members == {"auto_new_car_intent"}


def test_window_boundary_exact(rules: CompiledRules) -> None:
    h: History = {}
    first, second = NOW - 10 * DAY, NOW - 5 * DAY
    feed(rules, h, [(first, new_car_view("501", "NY")), (second, new_car_view("501", "NY"))])
    leave_at = first + 14 * DAY
    assert "auto_new_car_intent" in rules.evaluate(h, leave_at - 1).members
    assert "auto_new_car_intent" not in rules.evaluate(h, leave_at).members


def test_out_of_order_events_count(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - DAY, new_car_view()), (NOW - 5 * DAY, new_car_view())])
    stamps = next(iter(h.values()))
    assert stamps == sorted(stamps)
    assert "auto_new_car_intent" in rules.evaluate(h, NOW).members


def test_ttl_shorter_than_window() -> None:
    rules = CompiledRules(
        parse_rules(
            """segments:
  - id: clicker
    ttl: 2d
    rule: {at_least: 1, within: 30d, where: {field: type, equals: click}}
"""
        )
    )
    h: History = {}
    rules.record(h, NOW, rules.matching_traits({"type": "click"}), NOW)
    ev = rules.evaluate(h, NOW + DAY)
    assert ev.members == {"clicker"}
    assert ev.next_change == NOW + 2 * DAY
    assert rules.evaluate(h, NOW + 2 * DAY).members == frozenset()


def test_history_capped_to_what_rules_need(rules: CompiledRules) -> None:
    h: History = {}
    feed(rules, h, [(NOW - i * 3600, new_car_view()) for i in range(10)])
    lengths = sorted(len(v) for v in h.values())
    assert lengths == [1, 2]  # geo needs 1 event, intent needs 2


def test_paused_segment_is_never_a_member() -> None:
    rules = CompiledRules(
        parse_rules(
            """segments:
  - id: clicker
    status: paused
    rule: {within: 30d, where: {field: type, equals: click}}
"""
        )
    )
    h: History = {}
    rules.record(h, NOW, rules.matching_traits({"type": "click"}), NOW)
    assert rules.evaluate(h, NOW).members == frozenset()


def test_predicates_any_not_prefix_on_lists() -> None:
    rules = CompiledRules(
        parse_rules(
            """segments:
  - id: s
    rule:
      within: 1d
      where:
        any:
          - {field: categories, prefix: "auto/"}
          - all:
              - {field: attrs.plan, equals: gold}
              - not: {field: geo.country, in: [CAN]}
"""
        )
    )
    match = rules.matching_traits
    assert match({"categories": ["x", "auto/used"]})
    assert match({"attrs": {"plan": "gold"}, "geo": {"country": "USA"}})
    assert not match({"attrs": {"plan": "gold"}, "geo": {"country": "CAN"}})
    assert match({"categories": ["auto/new"]})
    assert not match({"attrs": {"plan": ["silver"]}})


PAUSED_PART = """segments:
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: p
    status: paused
    rule: {within: 1d, where: {field: type, equals: search}}
  - id: a_and_p
    of: {and: [a, p]}
  - id: a_not_p
    of: {and: [a, {not: p}]}
"""


def test_a_paused_part_counts_as_not_held_in_composites() -> None:
    # Ingest builds paused segments for a backfill; every reader must answer as lookups do.
    from segment_rules import Interpreter

    ruleset = parse_rules(PAUSED_PART)
    for evaluator in (CompiledRules(ruleset), Interpreter(ruleset)):
        assert evaluator.with_composites(frozenset({"a", "p"})) == ["a", "a_not_p"]
        assert evaluator.with_composites(frozenset({"p"})) == []
