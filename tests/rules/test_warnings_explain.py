"""Warnings (valid rules that are probably mistakes), the taxonomy, and explain()."""

from __future__ import annotations

from pathlib import Path

from segment_rules import CompiledRules, load_rules_file, parse_rules
from segment_rules.explain import explain
from tests.rules.helpers import iab

EXAMPLES = Path(__file__).resolve().parents[2] / "segment_rules" / "examples"


def warnings_of(text: str) -> list[str]:
    return [str(w) for w in parse_rules(text, "w.yaml").warnings]


def test_contradictory_tests_never_match() -> None:
    text = """segments:
  - id: a
    rule:
      within: 1d
      where: {all: [{field: type, equals: click}, {field: type, equals: page_view}]}
  - id: b
    rule: {within: 1d, where: {field: type, equals: pageview}}
  - id: c
    rule: {within: 1d, where: {all: [{field: geo.region, in: [CA, NY]}, {field: geo.region, not_in: [CA, NY]}]}}
  - id: d
    rule: {within: 1d, where: {all: [{field: categories, equals: a}, {field: categories, equals: b}]}}
  - id: e
    of: {and: [a, d]}
"""
    found = warnings_of(text)
    assert [w.split(":")[1] for w in found] == ["2", "6", "8", "12"]
    assert found[0].startswith(
        "w.yaml:2:5: warning: segment 'a' can never match: its event tests contradict each other"
    )
    assert "event types are page_view, click, conversion" in found[1]
    assert found[3] == (
        "w.yaml:12:5: warning: segment 'e' can never hold anyone: no combination of its parts "
        "satisfies 'of:'; fix the and/or/not"
    )


def test_impossible_composite_and_duplicates() -> None:
    text = """segments:
  - id: a
    rule: {at_least: 2, within: 1d, where: {all: [{field: type, equals: click}, {field: url, host: x.example}]}}
  - id: b
    rule: {within: 1d, at_least: 2, where: {all: [{field: url, host: x.example}, {field: type, equals: click}]}}
  - id: c
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: d
    of: {and: [c, {not: c}]}
  - id: e
    of: {or: [c, a]}
  - id: f
    of: {or: [a, c]}
"""
    assert warnings_of(text) == [
        "w.yaml:4:5: warning: segment 'b' duplicates 'a' (line 2): the same rule gives the same "
        "audience; remove one or change it",
        "w.yaml:8:5: warning: segment 'd' can never hold anyone: no combination of its parts "
        "satisfies 'of:'; fix the and/or/not",
        "w.yaml:12:5: warning: segment 'f' duplicates 'e' (line 10): the same rule gives the same "
        "audience; remove one or change it",
    ]


def test_examples_load_without_warnings_and_compile() -> None:
    basic = load_rules_file(EXAMPLES / "segments.yaml")
    every = load_rules_file(EXAMPLES / "all_constructs.yaml", iab())
    assert basic.warnings == ()
    assert every.warnings == ()
    assert len(CompiledRules(every).traits) > len(every.segments)


def test_taxonomy_names_and_tree() -> None:
    tax = iab()
    assert len(tax) == 1558
    assert tax.name(806) == "Purchase Intent* | Automotive Ownership | New Vehicles"
    assert list(tax.ancestors(806)) == [805, 752]
    assert 806 in tax.descendants(752)
    assert 752 in tax.descendants(752)
    assert tax.children(54) == [55, 56, 57, 58, 59]


def test_explain_reads_every_construct() -> None:
    tax = iab()
    rs = load_rules_file(EXAMPLES / "all_constructs.yaml", tax)
    texts = {s.id: explain(s, rs, tax) for s in rs.segments}
    assert texts["suv_readers"].splitlines()[2] == (
        "IAB Audience Taxonomy: 806 (Purchase Intent* | Automotive Ownership | New Vehicles)."
    )
    assert "Partner ids: dsp_alpha = suv-1001, ssp_beta = 77." in texts["suv_readers"]
    assert 'a category is "auto/new-cars/suv" or below it' in texts["suv_readers"]
    assert 'the host of url is "cars.example" or a subdomain of it' in texts["suv_readers"]
    assert texts["frequent_visitors"].endswith(
        'A cookie is in it when it has 3 to 10 events within the last 7 days where type is "page_view".'
    )
    assert "but none within the last 30 days (a lapsed user)" in texts["lapsed_buyers"]
    assert (
        "the sum of attrs.cart_value over its events within the last 30 days"
        in texts["cart_value_500"]
    )
    assert (
        "first to last within 2 days, the last within the last 14 days"
        in texts["model_then_dealer"]
    )
    assert "Membership ends 14 days after the last qualifying event" in texts["model_then_dealer"]
    assert "halving every 3 days" in texts["engaged_decaying"]
    assert (
        "IAB 805 (Purchase Intent* | Automotive Ownership) or an id below it"
        in texts["auto_audience_ids"]
    )
    assert texts["suv_in_market_no_lapsed"].splitlines()[-1] == (
        "A cookie is in it when (it is in suv_in_market (SUV readers who are engaged) and not "
        "(it is in lapsed_buyers (Bought in the last 60 days, but not in the last 30)))."
    )
    assert "It is paused" in texts["paused_test"]
