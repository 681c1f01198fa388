"""The memo in front of the event index (segment_rules.event_memo): exact on every repeat.

These build the generated Python alone (``accelerate=False``): the compiled matcher in
front of it has tests of its own (tests/rules/test_fast_match.py)."""

from __future__ import annotations

from typing import Any

import pytest

from segment_rules import CompiledRules, parse_rules
from segment_rules.event_index import EventIndex
from segment_rules.interpreter import event_passes


def index_of(wheres: list[str], limit: int = 1 << 15) -> tuple[EventIndex, CompiledRules]:
    lines = ["segments:"]
    for n, where in enumerate(wheres):
        lines.append(f"  - id: s{n}\n    rule: {{within: 1d, where: {where}}}")
    rules = CompiledRules(parse_rules("\n".join(lines) + "\n"))
    return EventIndex(rules.tests, memo_limit=limit, accelerate=False), rules


def check(index: EventIndex, rules: CompiledRules, events: list[dict[str, Any]]) -> None:
    for event in events * 2:  # the second time round, from the memos
        expected = {tid for tid, pred in rules.tests.items() if event_passes(pred, event)}
        assert set(index.match(event)) == expected, event
        assert set(rules.matching_traits(event)) == expected, event


def test_numbers_equal_as_keys_are_not_conflated() -> None:
    # 1 == 1.0 == True as dict keys, but true/false is not a number to the tests.
    index, rules = index_of(["{field: attrs.v, lt: 50}", "{field: attrs.v, equals: 1}"])
    check(index, rules, [{"attrs": {"v": v}} for v in (True, 1, 1.0, False, 0, [1], [True])])


@pytest.mark.parametrize(
    "urls",
    [
        ["https://a.example/models", "https://a.example/models/x", "https://a.example/mode"],
        ["https://a.example?/models/", "https://a.example/models/", "https://a.example#/x"],
        ["https://a.example", "https://a.example/", "https://a.example.evil/models/"],
        ["http:///models/a", "http://a.example/models/b", "HTTPS://A.EXAMPLE/models/"],
        ["a.example/models/", "//a.example/models/", "https://u@a.example:1/models/q"],
    ],
)
def test_url_cut_keeps_host_and_path_start(urls: list[str]) -> None:
    index, rules = index_of(
        [
            "{all: [{field: url, host_suffix: a.example}, {field: url, path_prefix: /models/}]}",
            "{field: url, host: a.example}",
            "{field: url, prefix: 'https://a.example/mo'}",
        ]
    )
    check(index, rules, [{"type": "page_view", "url": url} for url in urls])


def test_odd_shapes_are_matched_without_the_memo() -> None:
    index, rules = index_of(
        ["{field: categories, under: auto}", "{field: geo.country, equals: USA}"]
    )
    odd: list[dict[str, Any]] = [
        {"categories": "auto"},
        {"categories": ["a", "u", "t", "o"]},
        {"categories": [{"x": 1}]},
        {"categories": {"auto": 1}},
        {"geo": ["USA"]},
        {"geo": {"country": ["USA"]}},
        {"geo": {"country": {"USA": 1}}},
        {"type": ["page_view"], "geo": {"country": "USA"}},
        {"type": 3, "categories": ["auto"]},
    ]
    check(index, rules, odd)


def test_memos_stay_within_their_limit() -> None:
    index, rules = index_of(["{field: url, host: a.example}"], limit=4)
    check(index, rules, [{"url": f"https://h{n}.example/"} for n in range(20)])
    assert index.memos
    assert all(len(memo) <= 4 for memo in index.memos)


def test_text_that_is_no_http_url_is_never_remembered_by_its_cut() -> None:
    # No '/' after the 8th character: its cut says nothing of its path.
    index, rules = index_of(["{field: url, path_prefix: /mo}"])
    check(index, rules, [{"url": url} for url in ("/models", "/mx", "/mo?", "a/mo")])


def test_events_without_the_field_are_remembered_too() -> None:
    index, rules = index_of(["{field: url, host: a.example}"])
    check(index, rules, [{"type": "click"}])
    assert any(None in memo for memo in index.memos)
