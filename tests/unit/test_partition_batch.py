from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dmp.cookie_state import CookieState
from dmp.ids import uid_hash
from dmp.partition_batch import plan_batch
from segment_rules import CompiledRules, load_rules_file

EXAMPLES = Path(__file__).resolve().parents[2] / "segment_rules" / "examples" / "segments.yaml"
DAY = 86400.0
NOW = 1_800_000_000.0


@pytest.fixture
def rules() -> CompiledRules:
    return CompiledRules(load_rules_file(EXAMPLES))


def view(uid: str, ts: float, metro: str = "803") -> dict[str, Any]:
    return {
        "uid": uid,
        "ts": ts,
        "type": "page_view",
        "categories": ["auto/new-cars"],
        "geo": {"country": "USA", "region": "CA", "metro": metro},
    }


def test_new_cookies_get_dense_positions_and_changes(rules: CompiledRules) -> None:
    events = [view("a", NOW - 5), view("b", NOW - 4), view("a", NOW - 3)]
    plan = plan_batch(rules, events, [], {"a": None, "b": None}, next_local=7, now=NOW)
    assert plan.new_ids == [(7, uid_hash("a")), (8, uid_hash("b"))]
    assert plan.next_local == 9
    assert plan.added == {"auto_new_car_intent": [7], "geo_socal": [7, 8]} or plan.added == {
        "geo_socal": [7, 8],
        "auto_new_car_intent": [7],
    }
    assert plan.removed == {}
    assert plan.states["a"].members == {"auto_new_car_intent", "geo_socal"}
    assert plan.applied_events == 3
    assert plan.due["a"] == NOW - 5 + 14 * DAY


def test_stored_state_is_continued_not_restarted(rules: CompiledRules) -> None:
    first = plan_batch(rules, [view("a", NOW - 100)], [], {"a": None}, 0, NOW)
    stored = CookieState.decode(first.states["a"].encode())
    second = plan_batch(rules, [view("a", NOW - 50)], [], {"a": stored}, first.next_local, NOW)
    assert second.new_ids == []
    assert second.added == {"auto_new_car_intent": [0]}


def test_due_cookie_leaves_when_window_passes(rules: CompiledRules) -> None:
    first = plan_batch(rules, [view("a", NOW - 10), view("a", NOW - 5)], [], {"a": None}, 0, NOW)
    stored = CookieState.decode(first.states["a"].encode())
    due_at = first.due["a"]
    assert due_at is not None
    later = plan_batch(rules, [], ["a"], {"a": stored}, 1, due_at)
    assert later.removed == {"auto_new_car_intent": [0]}
    assert later.added == {}
    assert later.states["a"].members == {"geo_socal"}


def test_due_cookie_without_state_is_dropped_from_schedule(rules: CompiledRules) -> None:
    plan = plan_batch(rules, [], ["gone"], {"gone": None}, 0, NOW)
    assert plan.due == {"gone": None}
    assert plan.states == {}


def test_state_round_trip() -> None:
    state = CookieState(local=3, history={"t": [1.0, 2.5]}, members=frozenset({"x"}))
    assert CookieState.decode(state.encode()) == state
