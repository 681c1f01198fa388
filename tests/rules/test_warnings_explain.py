"""Warnings (valid rules that are probably mistakes), the taxonomy, and explain()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


# -- the acceptance list (issue 3): each warning with its message, file, line and column --------
NEVER = (
    "warning: segment 'a' can never match: its event tests contradict each other (e.g. two "
    "different values of one field under 'all', or an unknown event type; event types are "
    "page_view, click, conversion, impression, search, video_view); fix the tests"
)


@pytest.mark.parametrize(
    "where",
    [
        "{all: [{field: type, equals: click}, {field: type, equals: page_view}]}",
        "{field: type, equals: pageview}",
        "{field: type, in: [clicks, pageviews]}",
        "{all: [{field: geo.region, in: [CA, NY]}, {field: geo.region, not_in: [CA, NY]}]}",
        "{all: [{field: geo.region, missing: true}, {field: geo.region, equals: CA}]}",
    ],
)
def test_event_tests_that_can_never_match(where: str) -> None:
    text = f"""segments:
  - id: ok
    rule: {{within: 1d, where: {{field: type, equals: click}}}}
  - id: a
    rule:
      within: 1d
      where: {where}
"""
    assert warnings_of(text) == [f"w.yaml:4:5: {NEVER}"]


def test_composite_over_a_part_that_never_matches() -> None:
    text = """segments:
  - id: a
    rule: {within: 1d, where: {all: [{field: type, equals: click}, {field: type, equals: search}]}}
  - id: b
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: c
    of: {and: [b, {or: [a]}]}
  - id: d
    of: {or: [b, a]}
"""
    assert warnings_of(text) == [
        f"w.yaml:2:5: {NEVER}",
        "w.yaml:6:5: warning: segment 'c' can never hold anyone: no combination of its parts "
        "satisfies 'of:'; fix the and/or/not",
    ]


def test_lists_and_attrs_may_hold_many_values_so_no_warning() -> None:
    text = """segments:
  - id: a
    rule:
      within: 1d
      where: {all: [{field: categories, equals: a}, {field: categories, equals: b}]}
  - id: b
    rule:
      within: 1d
      where: {all: [{field: attrs.tag, equals: x}, {field: attrs.tag, equals: y}]}
"""
    assert warnings_of(text) == []


def test_duplicates_up_to_order_and_only_when_the_ttl_is_the_same() -> None:
    text = """segments:
  - id: a
    rule:
      any:
        - {within: 1d, where: {field: type, equals: click}}
        - {at_least: 2, within: 7d, where: {any: [{field: type, equals: search}, {field: url, host: x.example}]}}
  - id: same_reordered
    rule:
      any:
        - {within: 7d, at_least: 2, where: {any: [{field: url, host: x.example}, {field: type, equals: search}]}}
        - {within: 1d, where: {field: type, equals: click}}
  - id: longer_ttl
    ttl: 3d
    rule:
      any:
        - {within: 1d, where: {field: type, equals: click}}
        - {at_least: 2, within: 7d, where: {any: [{field: type, equals: search}, {field: url, host: x.example}]}}
  - id: other_window
    rule:
      any:
        - {within: 2d, where: {field: type, equals: click}}
        - {at_least: 2, within: 7d, where: {any: [{field: type, equals: search}, {field: url, host: x.example}]}}
"""
    assert warnings_of(text) == [
        "w.yaml:7:5: warning: segment 'same_reordered' duplicates 'a' (line 2): the same rule "
        "gives the same audience; remove one or change it",
    ]


def test_warnings_carry_file_line_and_column() -> None:
    (warning,) = parse_rules(
        "segments:\n  - id: a\n    rule: {within: 1d, where: {field: type, equals: klick}}\n",
        "w.yaml",
    ).warnings
    assert (warning.file, warning.line, warning.column) == ("w.yaml", 2, 5)
    assert warning.message.startswith("segment 'a' can never match")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmp.cli", "rules", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_validate_exit_code_errors_and_warnings(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments:\n  - id: a\n    of: {and: [ghost]}\n")
    done = _validate(bad)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{bad}:3:16: segment 'a' refers to 'ghost', which is not defined in this file"
    ]
    odd = tmp_path / "odd.yaml"
    odd.write_text(
        "segments:\n  - id: a\n    rule: {within: 1d, where: {field: type, equals: klick}}\n"
    )
    done = _validate(odd)
    assert done.returncode == 0  # warnings do not refuse the file
    assert done.stdout.startswith(f"{odd}: ok, 1 segments, version ")
    assert f"{odd}:2:5: warning: segment 'a' can never match" in done.stderr


def test_validate_prints_warnings_as_file_line_column(tmp_path: Path) -> None:
    odd = tmp_path / "odd.yaml"
    odd.write_text(
        "segments:\n  - id: a\n    rule: {within: 1d, where: {field: type, equals: klick}}\n"
    )
    (line,) = _validate(odd).stderr.splitlines()
    assert line.startswith(f"{odd}:2:5: warning: segment 'a' can never match")
