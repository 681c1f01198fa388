"""The pure part of a backfill: paused segments materialised, and history merged in.

A backfilled segment is paused while its history is rebuilt. Ingest evaluates paused base
segments like active ones (so their bitmaps are complete when the segment goes live) while
lookups keep hiding them (dmp/replica.py answers only active segments).

Merging replays the staged events (all from offsets before the partition's live-from
offset) through the live program, then puts back every trait the backfill does not fill:
those were fed live all along, so replaying would count their events twice. Replaying
through ``record`` keeps each trait kind's own rules (caps, windows, decay, sequences that
complete across the boundary) in one place, the compiler.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from typing import Any

from dmp.cookie_state import CookieState
from dmp.ids import uid_hash
from dmp.partition_batch import BatchPlan, settle
from segment_rules import CompiledRules, RuleSet, Segment


def materialise_paused(rules: CompiledRules) -> CompiledRules:
    """The program ingest runs: paused base segments evaluated (traits are the same ids)."""
    ruleset = rules.ruleset
    if all(s.status == "active" for s in ruleset.base_segments):
        return rules
    segments = tuple(
        replace(s, status="active") if s.rule is not None and s.status == "paused" else s
        for s in ruleset.segments
    )
    return CompiledRules(replace(ruleset, segments=segments))


def segment_program(ruleset: RuleSet, segment: Segment) -> CompiledRules:
    """A program of ``segment`` alone: its tests and traits, with the ids the full one uses."""
    return CompiledRules(replace(ruleset, segments=(replace(segment, status="active"),)))


def plan_merge(
    rules: CompiledRules,
    events: Iterable[Mapping[str, Any]],
    stored: Mapping[str, CookieState | None],
    next_local: int,
    now: float,
    targets: Collection[str],
) -> BatchPlan:
    """Replay history ``events`` into the traits ``targets`` only; re-evaluate the cookies."""
    plan = BatchPlan(next_local=next_local)
    touched: dict[str, CookieState] = {}
    before: dict[str, frozenset[str]] = {}
    kept: dict[str, dict[str, list[Any]]] = {}
    for event in events:
        uid = event["uid"]
        state = touched.get(uid)
        if state is None:
            state = stored.get(uid)
            if state is None:
                state = CookieState(local=plan.next_local)
                plan.new_ids.append((plan.next_local, uid_hash(uid)))
                plan.next_local += 1
            before[uid] = state.members
            touched[uid] = state
            kept[uid] = {
                tid: copy.deepcopy(v) for tid, v in state.history.items() if tid not in targets
            }
        rules.record(state.history, event["ts"], rules.matching_traits(event), now, event)
        plan.applied_events += 1
    for uid, state in touched.items():
        for tid in [t for t in state.history if t not in targets]:
            del state.history[tid]
        state.history.update(kept[uid])
        settle(plan, rules, uid, state, before[uid], now)
    return plan
