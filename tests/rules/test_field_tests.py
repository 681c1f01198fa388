"""Every field operator, on scalar and list fields, through the compiled index."""

from __future__ import annotations

from typing import Any

import pytest

from segment_rules import CompiledRules, RuleFileError, parse_rules
from segment_rules.event_tests import url_parts
from segment_rules.interpreter import event_passes
from tests.rules.helpers import iab

URL = "https://www.Cars.example:8443/models/suv?ref=1"
EVENT: dict[str, Any] = {
    "type": "page_view",
    "url": URL,
    "categories": ["news", "auto/new-cars/suv"],
    "geo": {"country": "USA", "region": "CA", "metro": "803"},
    "attrs": {"cart_value": 120.5, "plan": "gold", "query": "Electric SUV", "ids": ["806", 3]},
}

CASES: list[tuple[str, bool | None]] = [
    ("{field: type, equals: page_view}", True),
    ("{field: type, not_equals: page_view}", False),
    ("{field: geo.metro, in: [803, 501]}", True),
    ("{field: geo.metro, not_in: ['803']}", False),
    ("{field: categories, equals: news}", True),
    ("{field: categories, not_equals: news}", False),  # negation: no element equals
    ("{field: categories, not_in: [sports]}", True),
    ("{field: categories, prefix: auto/new}", True),
    ("{field: categories, suffix: /suv}", True),
    ("{field: categories, contains: new-cars}", True),
    ("{field: attrs.query, regex: '(?i)\\belectric\\b'}", True),
    ("{field: attrs.query, regex: '^electric'}", False),  # case matters without (?i)
    ("{field: attrs.cart_value, gt: 120}", True),
    ("{field: attrs.cart_value, gte: 120.5}", True),
    ("{field: attrs.cart_value, lt: 120.5}", False),
    ("{field: attrs.cart_value, lte: 120.5}", True),
    ("{field: attrs.cart_value, between: [100, 200]}", True),
    ("{field: attrs.cart_value, between: [121, 200]}", False),
    ("{field: attrs.plan, gt: 1}", False),  # text is not a number
    ("{field: attrs.plan, exists: true}", True),
    ("{field: attrs.coupon, exists: true}", False),
    ("{field: attrs.coupon, missing: true}", True),
    ("{field: attrs.plan, exists: false}", False),
    ("{field: categories, under: auto}", True),
    ("{field: categories, under: auto/new-cars}", True),
    ("{field: categories, under: 'auto/new-cars/suv/'}", True),
    ("{field: categories, under: auto/new}", False),  # path segments, not text prefixes
    ("{field: categories, under: sports}", False),
    ("{field: url, host: www.cars.example}", True),  # case and port do not matter
    ("{field: url, host: cars.example}", False),
    ("{field: url, host_suffix: cars.example}", True),
    ("{field: url, host_suffix: ars.example}", False),  # label boundaries
    ("{field: url, host_suffix: '*.cars.example'}", True),
    ("{field: url, path_prefix: /models/}", True),
    ("{field: url, path_prefix: '/models/suv?ref'}", None),  # refused: no query in a path
    ("{field: url, path_prefix: /dealers}", False),
]


@pytest.mark.parametrize(("test", "expected"), CASES)
def test_operator(test: str, expected: bool | None) -> None:
    text = f"segments:\n  - id: s\n    rule: {{within: 1d, where: {test}}}\n"
    if expected is None:
        with pytest.raises(RuleFileError, match="path_prefix"):
            parse_rules(text)
        return
    rules = CompiledRules(parse_rules(text))
    assert bool(rules.matching_traits(EVENT)) is expected
    (pred,) = rules.tests.values()
    assert event_passes(pred, EVENT) is expected


def test_under_iab_matches_descendants_by_taxonomy() -> None:
    text = (
        "segments:\n  - id: s\n    rule: {within: 1d, where: {field: attrs.ids, under_iab: 805}}\n"
    )
    rules = CompiledRules(parse_rules(text, "t.yaml", iab()))
    assert rules.matching_traits({"type": "click", "attrs": {"ids": ["806"]}})  # a child
    assert rules.matching_traits({"type": "click", "attrs": {"ids": [805]}})  # itself, as a number
    assert not rules.matching_traits({"type": "click", "attrs": {"ids": ["752"]}})  # the parent
    assert not rules.matching_traits({"type": "click", "attrs": {"ids": [True]}})


def test_untyped_and_odd_events() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {any: [{field: type, equals: click}, {field: geo.region, equals: CA}]}}
  - id: b
    rule: {within: 1d, where: {all: [{field: type, in: [click, search]}, {field: url, host: x.example}]}}
"""
    rules = CompiledRules(parse_rules(text))
    assert len(rules.matching_traits({"geo": {"region": "CA"}})) == 1  # no type at all
    assert len(rules.matching_traits({"type": ["click"], "url": "http://x.example/"})) == 2
    assert rules.matching_traits({"type": "search", "url": "x.example/no-scheme"}) == ()
    assert len(rules.matching_traits({"type": "search", "url": "//x.example/"})) == 1


@pytest.mark.parametrize(
    "url",
    [
        "https://Cars.Example:8080/new/suv?x=1#f",
        "http://u:p@www.a.example/",
        "not a url",
        "//host/p",
        "https://[::1]:80/x",
        "/rel/path?q",
        "https://a.example",
        "https://a.example?q=/x",
        "https://a.example#/x",
    ],
)
def test_url_parts_agree_with_urllib(url: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert url_parts(url) == (parts.hostname or "", parts.path)
    text = "segments:\n  - id: s\n    rule: {within: 1d, where: {field: url, path_prefix: /x}}\n"
    rules = CompiledRules(parse_rules(text))
    event = {"type": "click", "url": url}
    assert bool(rules.matching_traits(event)) == parts.path.startswith("/x")
