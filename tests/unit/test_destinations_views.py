"""A destination's live set: partner ids under it, and what a switch of live sets sends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bidder_adapter.partner_file import parse_partner_bytes
from bidder_adapter.profiles import PartnerProfile
from dmp.destinations_views import (
    PartnerView,
    base_parts,
    depends_on,
    live_segments,
    plan_switch,
    switch_changes,
)
from segment_rules import CompiledRules, RuleSet, parse_rules
from tests.bidder_adapter.partner_yaml import partner_yaml

RULES = """segments:
  - id: intent
    rule: {at_least: 1, within: 7d, where: {field: type, equals: page_view}}
  - id: geo
    status: paused
    rule: {at_least: 1, within: 7d, where: {field: geo.region, equals: CA}}
  - id: buyers
    rule: {at_least: 1, within: 7d, where: {field: type, equals: buy}}
  - id: local_intent
    of: {and: [intent, geo]}
  - id: intent_elsewhere
    of: {and: [intent, {not: geo}]}
  - id: local_intent_buyers
    status: paused
    of: {and: [local_intent, buyers]}
"""
BASES = ("intent", "geo", "buyers")


def profile(granted: str, mapping: str = "{}") -> PartnerProfile:
    """acme-dsp of the test partner file with other grants (beta-ssp is dropped)."""
    text = partner_yaml().split("  - partner_id: beta-ssp")[0]
    text = text.replace(
        "granted_segments: [auto_new_car_intent, new_car_socal]", f"granted_segments: {granted}"
    )
    start = text.index("    segment_id_map:")
    end = text.index("    output_format:")
    text = text[:start] + f"    segment_id_map: {mapping}\n" + text[end:]
    return parse_partner_bytes(text.encode(), "p.yaml").profiles["acme-dsp"]


def flipped(text: str, segment: str, status: str) -> str:
    """The rule text with one segment's status line set (the segment must have one)."""
    head, _, rest = text.partition(f"  - id: {segment}\n")
    line, _, tail = rest.partition("\n")
    assert line.strip().startswith("status:"), line
    return f"{head}  - id: {segment}\n    status: {status}\n{tail}"


def going_live(segment: str) -> tuple[RuleSet, frozenset[str], frozenset[str]]:
    """RULES with ``segment`` made active, and the live sets before and after."""
    live = parse_rules(flipped(RULES, segment, "active"))
    return (
        live,
        live_segments(CompiledRules(parse_rules(RULES))),
        live_segments(CompiledRules(live)),
    )


def test_partner_ids_under_the_rule_sets_own_statuses_are_what_lookups_answer() -> None:
    rules = CompiledRules(parse_rules(RULES))
    view = PartnerView.of(
        rules.ruleset,
        profile("[intent, geo, local_intent, intent_elsewhere]"),
        live_segments(rules),
    )
    assert live_segments(rules) == {"intent", "buyers", "local_intent", "intent_elsewhere"}
    for members in ([], ["intent"], ["intent", "geo"], ["geo", "buyers"], list(BASES)):
        assert view.held(members) == set(rules.with_composites(members))
    # geo is paused: as a part it is not held, so 'intent and not geo' holds.
    assert view.partner_ids(["intent", "geo"]) == {"intent", "intent_elsewhere"}


@given(st.sets(st.sampled_from(BASES)), st.sets(st.sampled_from(BASES)))
def test_held_matches_the_compiled_rules_for_any_statuses(
    members: set[str], paused: set[str]
) -> None:
    text = RULES.replace("    status: paused\n", "")
    for segment in paused:
        text = text.replace(f"  - id: {segment}\n", f"  - id: {segment}\n    status: paused\n")
    rules = CompiledRules(parse_rules(text))
    view = PartnerView.of(rules.ruleset, profile("[intent]"), live_segments(rules))
    assert view.held(members) == set(rules.with_composites(members))


def test_what_a_partner_depends_on() -> None:
    ruleset = parse_rules(RULES)
    assert depends_on(ruleset, ["local_intent_buyers"]) == {
        "local_intent_buyers",
        "local_intent",
        "intent",
        "geo",
        "buyers",
    }
    assert base_parts(ruleset, ["local_intent", "gone"]) == {"intent", "geo", "gone"}


def test_going_live_adds_the_members_going_paused_removes_them() -> None:
    paused = parse_rules(RULES)
    live, old, new = going_live("geo")
    partner = profile("[intent, geo]", "{geo: theirs-geo}")
    plan = plan_switch(live, partner, old, new)
    assert plan is not None
    assert plan.affected == {"geo"}
    assert plan.read == {"intent", "geo"}
    members = {
        "u1": frozenset({"geo"}),
        "u2": frozenset({"geo", "intent"}),
        "u3": frozenset({"intent"}),  # not affected: no line
    }
    up = switch_changes(
        PartnerView.of(live, partner, old), PartnerView.of(live, partner, new), members
    )
    assert up == [("u1", ["theirs-geo"], []), ("u2", ["theirs-geo"], [])]
    down = switch_changes(
        PartnerView.of(paused, partner, new), PartnerView.of(paused, partner, old), members
    )
    assert down == [("u1", [], ["theirs-geo"]), ("u2", [], ["theirs-geo"])]


def test_a_composite_grant_follows_its_part_going_live() -> None:
    live, old, new = going_live("geo")
    partner = profile("[local_intent, intent_elsewhere]")
    plan = plan_switch(live, partner, old, new)
    assert plan is not None
    assert plan.affected == {"geo"}
    members = {"both": frozenset({"intent", "geo"}), "geo_only": frozenset({"geo"})}
    changes = switch_changes(
        PartnerView.of(live, partner, old), PartnerView.of(live, partner, new), members
    )
    # 'both' was in intent_elsewhere while geo was paused; now it is local.
    assert changes == [("both", ["local_intent"], ["intent_elsewhere"])]


def test_a_composite_going_live_looks_at_the_members_of_its_parts() -> None:
    live, old, new = going_live("local_intent_buyers")
    partner = profile("[local_intent_buyers]")
    plan = plan_switch(live, partner, old, new)
    assert plan is not None
    assert plan.affected == {"intent", "geo", "buyers"}


def test_a_switch_of_segments_the_partner_does_not_depend_on_sends_nothing() -> None:
    live, old, new = going_live("geo")
    assert plan_switch(live, profile("[buyers]"), old, new) is None
