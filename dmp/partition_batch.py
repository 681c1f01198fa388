"""The pure heart of ingest: one partition's events + stored cookie states -> what to write.

No I/O here, so the exactly-once story reduces to "write this plan atomically with the offset".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dmp.cookie_state import CookieState
from dmp.ids import uid_hash
from segment_rules import CompiledRules


@dataclass
class BatchPlan:
    states: dict[str, CookieState] = field(default_factory=dict)
    new_ids: list[tuple[int, int]] = field(default_factory=list)  # (local, uid hash)
    next_local: int = 0
    added: dict[str, list[int]] = field(default_factory=dict)  # segment -> locals
    removed: dict[str, list[int]] = field(default_factory=dict)
    due: dict[str, float | None] = field(default_factory=dict)  # uid -> next change, None = none
    applied_events: int = 0
    # Cookies whose stored data this batch removes (dmp/privacy.py), and of those the ones
    # with nothing left, by position: their state key is deleted and their id hash blanked.
    erased: list[str] = field(default_factory=list)
    forgotten: dict[str, int] = field(default_factory=dict)

    @property
    def change_count(self) -> int:
        return sum(map(len, self.added.values())) + sum(map(len, self.removed.values()))


def settle(
    plan: BatchPlan,
    rules: CompiledRules,
    uid: str,
    state: CookieState,
    old: frozenset[str],
    now: float,
) -> None:
    """Evaluate a touched cookie once and put its membership changes into ``plan``."""
    rules.prune(state.history, now)
    evaluation = rules.evaluate(state.history, now)
    state.members = evaluation.members
    for seg in evaluation.members - old:
        plan.added.setdefault(seg, []).append(state.local)
    for seg in old - evaluation.members:
        plan.removed.setdefault(seg, []).append(state.local)
    plan.states[uid] = state
    plan.due[uid] = evaluation.next_change


def plan_batch(
    rules: CompiledRules,
    events: Iterable[Mapping[str, Any]],
    due_uids: Iterable[str],
    stored: Mapping[str, CookieState | None],
    next_local: int,
    now: float,
    erase: Collection[str] = frozenset(),
) -> BatchPlan:
    """Apply events (in offset order) and re-evaluate due cookies at ``now``.

    Cookies in ``erase`` (opted out or erased) first lose their whole history, so they leave
    every segment; events of theirs in the batch (only ever newer consent) apply afterwards.
    """
    plan = BatchPlan(next_local=next_local)
    touched: dict[str, CookieState] = {}
    before: dict[str, frozenset[str]] = {}

    def state_for(uid: str) -> CookieState | None:
        if uid in touched:
            return touched[uid]
        state = stored.get(uid)
        if state is not None:
            touched[uid] = state
            before[uid] = state.members
        return state

    for uid in erase:
        plan.erased.append(uid)
        erased_state = state_for(uid)
        if erased_state is not None:
            erased_state.history.clear()

    for event in events:
        uid = event["uid"]
        state = state_for(uid)
        if state is None:
            state = CookieState(local=plan.next_local)
            plan.new_ids.append((plan.next_local, uid_hash(uid)))
            plan.next_local += 1
            touched[uid] = state
            before[uid] = frozenset()
        rules.record(state.history, event["ts"], rules.matching_traits(event), now, event)
        plan.applied_events += 1

    for uid in due_uids:
        if state_for(uid) is None:
            plan.due[uid] = None  # state expired: nothing left to re-evaluate

    for uid, state in touched.items():
        settle(plan, rules, uid, state, before[uid], now)
    for uid in erase:
        gone = touched.get(uid)
        if gone is not None and not (gone.history or gone.members):
            plan.forgotten[uid] = gone.local
        elif gone is None:
            plan.due[uid] = None
    return plan
