"""Backfill merge: history before the live-from offset, merged in, equals having had it live."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dmp.backfill_plan import materialise_paused, plan_merge, segment_program
from dmp.cookie_state import CookieState
from dmp.partition_batch import plan_batch
from segment_rules import CompiledRules, History, parse_rules

NOW = 1_800_000_000.0
DAY = 86400.0

OLD = """
segments:
  - id: viewers
    rule: {at_least: 2, within: 7d, where: {field: type, equals: page_view}}
"""
# The new segment shares the page_view test with "viewers" (without needing more of its
# history: that case is reported, see test_backfill_job) and brings traits of every kind.
NEW_SEGMENT = """
  - id: shoppers
    status: paused
    rule:
      any:
        - {at_least: 1, within: 5d, where: {field: type, equals: page_view}}
        - {sum: attrs.value, at_least: 100, within: 20d, where: {field: type, equals: buy}}
        - {first_seen_within: 2d, where: {field: type, equals: click}}
        - sequence:
            - {field: type, equals: click}
            - {field: type, equals: buy}
          then_within: 3d
          within: 14d
        - score:
            - {points: 2, where: {field: type, equals: click}}
            - {points: 5, where: {field: type, equals: buy}}
          at_least: 9
          half_life: 2d
"""
NEW = OLD + NEW_SEGMENT

events_st = st.lists(
    st.fixed_dictionaries(
        {
            "uid": st.sampled_from(["a", "b", "c"]),
            "ts": st.floats(NOW - 25 * DAY, NOW, allow_nan=False),
            "type": st.sampled_from(["page_view", "buy", "click"]),
            "attrs": st.fixed_dictionaries({"value": st.sampled_from([10, 40, 70])}),
        }
    ),
    max_size=40,
)


def run(
    rules: CompiledRules,
    events: list[dict[str, Any]],
    states: dict[str, CookieState],
    next_local: int,
) -> int:
    """Ingest: batches of 5 events, states carried from batch to batch."""
    for i in range(0, len(events), 5):
        plan = plan_batch(rules, events[i : i + 5], [], dict(states), next_local, NOW)
        states.update(plan.states)
        next_local = plan.next_local
    return next_local


def close(a: History, b: History) -> bool:
    if a.keys() != b.keys():
        return False
    for tid, left in a.items():
        flat_a = [x for e in left for x in (e if isinstance(e, list) else [e])]
        right = b[tid]
        flat_b = [x for e in right for x in (e if isinstance(e, list) else [e])]
        if len(flat_a) != len(flat_b) or not all(
            math.isclose(x, y, rel_tol=1e-9) for x, y in zip(flat_a, flat_b, strict=True)
        ):
            return False
    return True


@settings(max_examples=200, deadline=None)
@given(events=events_st, split=st.integers(0, 40))
def test_history_merged_before_live_from_equals_a_live_run(
    events: list[dict[str, Any]], split: int
) -> None:
    old = materialise_paused(CompiledRules(parse_rules(OLD, "old.yaml")))
    new = materialise_paused(CompiledRules(parse_rules(NEW, "new.yaml")))
    ruleset = parse_rules(NEW, "new.yaml")
    targets = {t.id for t in segment_program(ruleset, ruleset.segment("shoppers")).traits} - {
        t.id for t in old.traits
    }
    before, after = events[:split], events[split:]

    reference: dict[str, CookieState] = {}
    run(new, events, reference, 0)

    states: dict[str, CookieState] = {}
    next_local = run(old, before, states, 0)  # the old version, before the live-from offset
    next_local = run(new, after, states, next_local)  # the paused segment, fed live
    plan = plan_merge(new, before, dict(states), next_local, NOW, targets)
    states.update(plan.states)

    assert states.keys() == reference.keys()
    for uid, want in reference.items():
        assert close(states[uid].history, want.history), uid
        assert states[uid].members == want.members, uid


def test_paused_segments_are_materialised_and_shared_traits_are_not_replayed() -> None:
    new = materialise_paused(CompiledRules(parse_rules(NEW, "new.yaml")))
    old_ids = {t.id for t in CompiledRules(parse_rules(OLD, "old.yaml")).traits}
    view = {"uid": "a", "ts": NOW - 3600, "type": "page_view"}
    live = plan_batch(new, [view, view], [], {}, 0, NOW)
    state = live.states["a"]
    assert state.members == {"viewers", "shoppers"}
    shared = next(iter(old_ids))
    assert len(state.history[shared]) == 2
    targets = {t.id for t in new.traits} - old_ids
    plan = plan_merge(new, [view], {"a": state}, live.next_local, NOW, targets)
    # The shared page_view times were fed live all along: the replay must not count twice.
    assert len(plan.states["a"].history[shared]) == 2
    assert plan.added == {}
    assert plan.applied_events == 1


def test_merge_numbers_a_cookie_seen_only_in_history() -> None:
    new = materialise_paused(CompiledRules(parse_rules(NEW, "new.yaml")))
    buys = [
        {"uid": "z", "ts": NOW - n * DAY, "type": "buy", "attrs": {"value": 70}} for n in (1, 2)
    ]
    targets = {t.id for t in new.traits}
    plan = plan_merge(new, buys, {}, 7, NOW, targets)
    assert [local for local, _ in plan.new_ids] == [7]
    assert plan.next_local == 8
    assert plan.added == {"shoppers": [7]}
    assert plan.due["z"] is not None


def test_unpaused_rules_are_left_as_they_are() -> None:
    rules = CompiledRules(parse_rules(OLD, "old.yaml"))
    assert materialise_paused(rules) is rules
    paused = CompiledRules(parse_rules(NEW, "new.yaml"))
    assert materialise_paused(paused).version == paused.version
