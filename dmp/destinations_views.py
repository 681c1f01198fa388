"""What a partner is sent for a cookie's memberships, under one set of live segments (pure).

Ingest keeps paused segments' bitmaps and writes their changes to the change streams
(docs/decisions/0005-backfill.md); a destination sends only what lookups answer. Which
segments are live is therefore part of a destination's own state: it exports under one
*live set* at a time, kept beside its cursor, and a rule version that changes the set is
a switch at one point of every change stream (dmp/destinations_switch.py). This module
holds the arithmetic both sides of a switch need.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from bidder_adapter.profiles import PartnerProfile
from segment_rules import CompiledRules, RuleSet, Segment
from segment_rules.graph import evaluate_composite, refs, topological_order

# One partner line's content: (our cookie id, partner segment ids added, removed).
Change = tuple[str, list[str], list[str]]


def live_segments(rules: CompiledRules) -> frozenset[str]:
    """The segments lookups answer under ``rules``: the active ones, composites included."""
    return frozenset(s.id for s in rules.ruleset.segments if s.status == "active")


@dataclass(frozen=True)
class PartnerView:
    """A partner's segment ids for stored memberships, with only ``live`` segments held.

    Stored memberships include paused segments; a paused part of a composite counts as
    not held, as lookups count it (``CompiledRules.with_composites`` does the same for the
    rule version's own statuses; here the live set is the destination's).
    """

    ruleset: RuleSet
    profile: PartnerProfile
    live: frozenset[str]
    bases: frozenset[str]  # live ids that are not composites of the rule set
    composites: tuple[Segment, ...]  # live composites, each after what it refers to
    # Composite grants and many-to-one mappings need a user's whole membership to know
    # whether the partner's segment really changed; plain ones follow the ops exactly.
    whole_membership: bool

    @classmethod
    def of(cls, ruleset: RuleSet, profile: PartnerProfile, live: Collection[str]) -> PartnerView:
        live_set = frozenset(live)
        composite_ids = {s.id for s in ruleset.composite_segments}
        composites = tuple(
            s for s in topological_order(ruleset.segments) if s.of is not None and s.id in live_set
        )
        mapped = [profile.segment_id_map.get(s, s) for s in profile.granted_segments]
        whole = bool(profile.granted_segments & composite_ids) or len(set(mapped)) < len(mapped)
        return cls(ruleset, profile, live_set, live_set - composite_ids, composites, whole)

    def held(self, members: Iterable[str]) -> set[str]:
        """Our live segment ids a cookie with these stored memberships is in."""
        held = set(members) & self.bases
        for seg in self.composites:
            assert seg.of is not None
            if evaluate_composite(seg.of, held):
                held.add(seg.id)
        return held

    def partner_ids(self, members: Iterable[str]) -> set[str]:
        return self.profile.mapped(self.held(members))


def depends_on(ruleset: RuleSet, granted: Iterable[str]) -> frozenset[str]:
    """The grants and, through composites, every segment they are built from."""
    by_id = {s.id: s for s in ruleset.segments}
    seen: set[str] = set()
    todo = list(granted)
    while todo:
        sid = todo.pop()
        if sid in seen:
            continue
        seen.add(sid)
        seg = by_id.get(sid)
        if seg is not None and seg.of is not None:
            todo.extend(r.segment_id for r in refs(seg.of))
    return frozenset(seen)


def base_parts(ruleset: RuleSet, ids: Iterable[str]) -> frozenset[str]:
    """``ids`` with composites replaced by the base segments they are built from.

    An id the rule set no longer defines counts as a base: its bitmaps are still there.
    """
    composites = {s.id for s in ruleset.composite_segments}
    return frozenset(s for s in depends_on(ruleset, ids) if s not in composites)


@dataclass(frozen=True)
class SwitchPlan:
    """What a switch of live sets must read for one partner, at the cut."""

    read: frozenset[str]  # base segments a partner line depends on: a cookie's membership
    affected: frozenset[str]  # base segments whose members may see their partner ids change


def plan_switch(
    ruleset: RuleSet, profile: PartnerProfile, old: frozenset[str], new: frozenset[str]
) -> SwitchPlan | None:
    """None when no segment this partner depends on changed (nothing to send)."""
    reach = depends_on(ruleset, profile.granted_segments)
    changed = (old ^ new) & reach
    if not changed:
        return None
    # A segment's status only changes what its own members hold (and a composite's only
    # what members of its parts hold): their members are the cookies to look at.
    return SwitchPlan(read=base_parts(ruleset, reach), affected=base_parts(ruleset, changed))


def switch_changes(
    old: PartnerView, new: PartnerView, members: Mapping[str, frozenset[str]]
) -> list[Change]:
    """Per cookie (by id), what the partner must add and remove for the switch."""
    changes = (switch_change(old, new, uid, members[uid]) for uid in sorted(members))
    return [change for change in changes if change is not None]


def switch_change(
    old: PartnerView, new: PartnerView, uid: str, members: frozenset[str]
) -> Change | None:
    """What the partner must add and remove for one cookie; None when nothing."""
    before = old.partner_ids(members)
    after = new.partner_ids(members)
    if before == after:
        return None
    return (uid, sorted(after - before), sorted(before - after))
