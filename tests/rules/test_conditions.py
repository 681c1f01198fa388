"""Frequency, recency, sums, sequences, scores, TTLs: memberships and when they change.

Every ``Cookie.members`` call also checks the reference interpreter gives the same answer.
"""

from __future__ import annotations

import pytest

from segment_rules import CompiledRules, History, parse_rules
from tests.rules.helpers import DAY, HOUR, NOW, Cookie


def test_at_least_and_at_most_between() -> None:
    c = Cookie(
        "segments:\n  - id: s\n    rule: {at_least: 2, at_most: 3, within: 1d, "
        "where: {field: type, equals: click}}\n"
    )
    for k in range(4):
        c.see(NOW - k * HOUR, type="click")
    assert c.members(NOW) == frozenset()  # 4 clicks: too many
    # The oldest leaves at NOW - 3h + 1d: then 3 clicks, in; that is the next change.
    assert c.next_change(NOW) == NOW - 3 * HOUR + DAY
    assert c.members(NOW - 3 * HOUR + DAY) == {"s"}
    assert c.members(NOW - HOUR + DAY) == frozenset()  # 1 left
    assert c.history
    assert max(len(v) for v in c.history.values()) <= 4


def test_last_seen_within_boundary() -> None:
    c = Cookie(
        "segments:\n  - id: s\n    rule: {last_seen_within: 48h, where: {field: type, equals: click}}\n"
    )
    c.see(NOW, type="click")
    assert c.members(NOW + 48 * HOUR - 1) == {"s"}
    assert c.next_change(NOW) == NOW + 48 * HOUR
    assert c.members(NOW + 48 * HOUR) == frozenset()


def test_lapsed_user_enters_after_the_quiet_window_and_leaves_after_the_lookback() -> None:
    c = Cookie(
        "segments:\n  - id: lapsed\n    rule: {not_seen_within: 30d, seen_within: 60d, "
        "where: {field: type, equals: conversion}}\n"
    )
    c.see(NOW, type="conversion")
    assert c.members(NOW + 29 * DAY) == frozenset()
    assert c.next_change(NOW + 29 * DAY) == NOW + 30 * DAY  # lapsed-ness begins
    assert c.members(NOW + 30 * DAY) == {"lapsed"}
    assert c.next_change(NOW + 30 * DAY) == NOW + 60 * DAY
    assert c.members(NOW + 60 * DAY) == frozenset()
    # A purchase during the lapse ends it at once.
    c.see(NOW + 45 * DAY, now=NOW + 45 * DAY, type="conversion")
    assert c.members(NOW + 45 * DAY) == frozenset()


def test_lapsed_default_lookback_is_the_retention() -> None:
    c = Cookie(
        "retention: 40d\nsegments:\n  - id: lapsed\n    rule: {not_seen_within: 30d, "
        "where: {field: type, equals: conversion}}\n"
    )
    c.see(NOW, type="conversion")
    assert c.members(NOW + 39 * DAY) == {"lapsed"}
    assert c.members(NOW + 40 * DAY) == frozenset()


def test_first_seen_within() -> None:
    text = "segments:\n  - id: new\n    rule: {first_seen_within: 3d, where: {field: categories, under: auto}}\n"
    c = Cookie(text)
    c.see(NOW, categories=["auto/used"])
    c.see(NOW + DAY, now=NOW + DAY, categories=["auto"])
    assert c.members(NOW + DAY) == {"new"}
    assert c.next_change(NOW + DAY) == NOW + 3 * DAY
    assert c.members(NOW + 3 * DAY) == frozenset()  # first seen 3 days ago: not new any more
    old = Cookie(text)
    old.see(NOW - 20 * DAY, categories=["auto"])
    old.see(NOW, categories=["auto"])
    assert old.members(NOW) == frozenset()


def test_sum_and_average_within_a_window() -> None:
    c = Cookie(
        """segments:
  - id: cart
    rule: {sum: attrs.cart_value, at_least: 500, within: 30d, where: {field: type, equals: conversion}}
  - id: avg
    rule: {average: attrs.cart_value, at_least: 100, at_most: 300, within: 30d}
"""
    )
    c.see(NOW - 10 * DAY, type="conversion", attrs={"cart_value": 300})
    c.see(NOW - 5 * DAY, type="conversion", attrs={"cart_value": "250"})  # text: not counted
    c.see(NOW - DAY, type="conversion", attrs={"cart_value": 200.5})
    c.see(NOW, type="page_view", attrs={"cart_value": 1000})  # not a conversion
    assert c.members(NOW) == {"cart"}  # 500.5; average over all three numbers is 500.2
    assert c.next_change(NOW) == NOW - 10 * DAY + 30 * DAY
    assert c.members(NOW + 20 * DAY) == frozenset()  # the 300 left the window
    assert c.members(NOW + 29 * DAY) == frozenset()  # only the 1000: average too high
    with pytest.raises(ValueError, match="needs the event"):
        c.rules.record({}, NOW, c.rules.matching_traits({"type": "conversion"}), NOW)


SEQUENCE = """segments:
  - id: seq
    rule:
      sequence:
        - {field: url, path_prefix: /models/}
        - {field: url, path_prefix: /dealers}
      then_within: 2d
      within: 14d
"""


def test_sequence_in_order_within_the_span() -> None:
    c = Cookie(SEQUENCE)
    c.see(NOW - 3 * DAY, url="https://cars.example/models/a")
    c.see(NOW - DAY + 1, url="https://cars.example/dealers")  # 2 days and 1 s later: too slow
    assert c.members(NOW) == frozenset()
    c.see(NOW - DAY, url="https://cars.example/dealers/9")  # exactly 2 days: in time
    assert c.members(NOW) == {"seq"}
    assert c.next_change(NOW) == NOW - DAY + 14 * DAY
    assert c.members(NOW + 13 * DAY) == frozenset()


def test_sequence_wrong_order_and_late_first_step() -> None:
    c = Cookie(SEQUENCE)
    c.see(NOW - DAY, url="https://cars.example/dealers")
    c.see(NOW, url="https://cars.example/models/a")
    assert c.members(NOW) == frozenset()
    c.see(NOW - 2 * DAY, url="https://cars.example/models/b")  # arrives late, happened first
    assert c.members(NOW) == {"seq"}


def test_sequence_completed_by_a_late_first_step_near_the_window_edge() -> None:
    c = Cookie(SEQUENCE)
    c.see(NOW - 13 * DAY, url="https://cars.example/dealers")
    c.see(NOW - 14.5 * DAY, url="https://cars.example/models/a")  # older than 'within', late
    assert c.members(NOW) == {"seq"}
    assert c.next_change(NOW) == NOW + DAY


def test_windowed_score() -> None:
    c = Cookie(
        """segments:
  - id: engaged
    rule:
      score:
        - {points: 1, where: {field: type, equals: page_view}}
        - {points: 3, where: {field: type, equals: click}}
      at_least: 5
      within: 7d
"""
    )
    c.see(NOW - 6 * DAY, type="click")
    c.see(NOW - DAY, type="page_view")
    assert c.members(NOW) == frozenset()  # 4 points
    c.see(NOW, type="page_view")
    assert c.members(NOW) == {"engaged"}
    assert c.next_change(NOW) == NOW + DAY  # the click leaves the window
    assert c.members(NOW + DAY) == frozenset()


def test_decaying_score_leaves_when_it_crosses_the_threshold() -> None:
    c = Cookie(
        """segments:
  - id: hot
    rule:
      score: [{points: 8, where: {field: type, equals: conversion}}]
      at_least: 2
      half_life: 1d
"""
    )
    c.see(NOW, type="conversion")
    assert c.members(NOW) == {"hot"}
    crossing = c.next_change(NOW)
    assert crossing == pytest.approx(NOW + 2 * DAY)  # 8 -> 4 -> 2
    assert crossing is not None
    assert c.rules.evaluate(c.history, crossing - 1).members == {"hot"}
    assert c.rules.evaluate(c.history, crossing).members == frozenset()
    c.see(NOW + DAY, now=NOW + DAY, type="conversion")  # 4 + 8 = 12 at NOW + 1d
    assert c.next_change(NOW + DAY) == pytest.approx(NOW + DAY + DAY * 2.584962500721156)


def test_a_score_shared_by_two_segments_counts_each_event_once() -> None:
    score = "{score: [{points: 1, where: {field: type, equals: click}}, {points: 1, where: {field: type, equals: click}}], at_least: 3, half_life: 1h}"
    c = Cookie(f"segments:\n  - id: a\n    rule: {score}\n  - id: b\n    rule: {score}\n")
    c.see(NOW, type="click")  # two entries match: 2 points, not 4
    assert c.members(NOW) == frozenset()
    c.see(NOW, type="click")
    assert c.members(NOW) == {"a", "b"}


def test_ttl_expires_unless_requalified() -> None:
    c = Cookie(
        "segments:\n  - id: s\n    ttl: 2d\n    rule: {within: 30d, where: {field: type, equals: click}}\n"
    )
    c.see(NOW, type="click")
    assert c.next_change(NOW + DAY) == NOW + 2 * DAY
    assert c.members(NOW + 2 * DAY) == frozenset()
    c.see(NOW + 3 * DAY, now=NOW + 3 * DAY, type="click")
    assert c.members(NOW + 4 * DAY) == {"s"}


def test_nested_boolean_conditions_and_three_level_composites() -> None:
    c = Cookie(
        """segments:
  - id: auto
    rule:
      all:
        - {at_least: 2, within: 7d, where: {field: categories, under: auto}}
        - any:
            - {within: 7d, where: {field: geo.region, equals: CA}}
            - not: {within: 7d, where: {field: type, equals: conversion}}
  - id: ca
    rule: {within: 7d, where: {field: geo.region, equals: CA}}
  - id: both
    of: {and: [auto, ca]}
  - id: top
    of: {or: [both, {and: [auto, {not: ca}]}]}
  - id: top3
    of: {and: [top, auto]}
"""
    )
    c.see(NOW - DAY, categories=["auto/used"], type="conversion")
    c.see(NOW, categories=["auto"], type="conversion")
    assert c.all_members(NOW) == []  # converted and not in CA
    c.see(NOW, geo={"region": "CA"})
    assert c.all_members(NOW) == ["auto", "ca", "both", "top", "top3"]


def test_late_events_count_and_too_late_events_are_dropped() -> None:
    rules = CompiledRules(
        parse_rules(
            "segments:\n  - id: s\n    rule: {at_least: 2, within: 1d, where: {field: type, equals: click}}\n"
        )
    )
    h: History = {}
    rules.record(h, NOW, rules.matching_traits({"type": "click"}), NOW)
    rules.record(h, NOW - 2 * HOUR, rules.matching_traits({"type": "click"}), NOW)  # late
    assert rules.evaluate(h, NOW).members == {"s"}
    rules.record(h, NOW - 2 * DAY, rules.matching_traits({"type": "click"}), NOW)  # too late
    assert sum(map(len, h.values())) == 2


def test_unused_state_is_dropped_and_history_is_bounded() -> None:
    rules = CompiledRules(
        parse_rules(
            "segments:\n  - id: s\n    rule: {at_least: 3, within: 1d, where: {field: type, equals: click}}\n"
        )
    )
    h: History = {"old-trait": [NOW]}
    for k in range(50):
        rules.record(h, NOW - k, rules.matching_traits({"type": "click"}), NOW)
    rules.prune(h, NOW)
    assert list(map(len, h.values())) == [3]
