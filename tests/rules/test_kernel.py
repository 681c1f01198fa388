"""The C kernel (segment_rules/_kernel.c) does exactly what compiler.py's Python does."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segment_rules import CompiledRules, History, parse_rules
from segment_rules.compiler import Kernel  # None when the extension is not built
from segment_rules.model import RuleSet
from tests.rules.strategies import STEP, events, rule_files, small_taxonomy

NOW = 1_800_000_000.0
TAXONOMY = small_taxonomy()
PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
needs_kernel = pytest.mark.skipif(Kernel is None, reason="the C kernel is not built")


def load(doc: dict[str, Any]) -> RuleSet:
    return parse_rules(yaml.safe_dump(doc, sort_keys=False), "kernel.yaml", TAXONOMY)


def test_the_kernel_is_built_where_the_tests_run() -> None:
    # pip install -e . builds it; without it every test below would skip, unseen.
    assert Kernel is not None
    assert CompiledRules(load({"segments": []}))._kernel is not None


def test_native_false_keeps_the_python() -> None:
    assert CompiledRules(load({"segments": []}), native=False)._kernel is None


_TIMES = st.integers(-2, 12 * 48).map(lambda k: NOW - k * STEP)


def stored_state(kind: str) -> st.SearchStrategy[list[Any]]:
    """A trait's state as the store may hold it (compiler.py's module docstring)."""
    if kind == "times":
        return st.lists(_TIMES, min_size=1, max_size=6).map(sorted)
    if kind == "values":
        pairs = st.lists(st.tuples(_TIMES, st.sampled_from([0, 5, 120.5])), min_size=1)
        return pairs.map(lambda ps: [[t, v] for t, v in sorted(ps)])
    if kind == "first":
        return st.lists(_TIMES, min_size=2, max_size=2).map(sorted)
    if kind == "decay":
        return st.tuples(_TIMES, st.sampled_from([0.5, 3, 9.25])).map(list)
    return st.tuples(_TIMES).map(list)


# The windows the strategies' rules use (tests/rules/strategies.py: DURATIONS, "10d").
WINDOWS = [3600.0 * h for h in (1, 6, 24, 48, 72, 168, 240)]


def held_times(history: History) -> set[float]:
    """Every time in a history: entries, and the first element of [time, value] pairs."""
    found: set[float] = set()
    for state in history.values():
        for entry in state:
            found.add(float(entry[0] if isinstance(entry, list) else entry))
    return found


def same(mine: History, theirs: History) -> bool:
    """Equal as stored: the same JSON (ints stay ints), whatever the order of the traits."""
    return orjson.dumps(mine, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        theirs, option=orjson.OPT_SORT_KEYS
    )


@needs_kernel
@PROPERTY
@given(doc=rule_files(), stream=st.data())
def test_kernel_agrees_with_python(doc: dict[str, Any], stream: st.DataObject) -> None:
    """From a stored history, batches at moving times, in any order of event times, some
    read back from JSON (as the store does), each followed by prune and evaluate: the same
    histories, memberships and next change times, exactly."""
    ruleset = load(doc)
    native, python = CompiledRules(ruleset), CompiledRules(ruleset, native=False)
    assert native._kernel is not None
    assert python._kernel is None
    # A stored history: of every kind, and holding more than the rules keep now (a rule
    # changed), some of it expired.
    mine: History = {}
    for trait in native.traits:
        if stream.draw(st.booleans()):
            mine[trait.id] = stream.draw(stored_state(trait.kind))
    theirs = copy.deepcopy(mine)
    now = NOW
    for _ in range(stream.draw(st.integers(1, 4))):
        now += stream.draw(st.integers(0, 3 * 48)) * STEP
        batch = stream.draw(st.lists(st.tuples(st.integers(-2, 12 * 48), events()), max_size=12))
        for back, event in batch:
            ts = now - back * STEP
            tests = native.matching_traits(event)
            native.record(mine, ts, tests, now, event)
            python.record(theirs, ts, tests, now, event)
            assert same(mine, theirs)
        if stream.draw(st.booleans()):
            mine = orjson.loads(orjson.dumps(mine))
            theirs = orjson.loads(orjson.dumps(theirs))
        at = now + stream.draw(st.integers(0, 10 * 48)) * STEP
        native.prune(mine, at)
        python.prune(theirs, at)
        assert same(mine, theirs)
        assert native.evaluate(mine, at) == python.evaluate(theirs, at)
        # And exactly at the boundaries: a time held plus a window the rules use.
        times = sorted(held_times(mine))
        for _ in range(stream.draw(st.integers(0, 6)) if times else 0):
            edge = stream.draw(st.sampled_from(times)) + stream.draw(st.sampled_from(WINDOWS))
            assert native.evaluate(mine, edge) == python.evaluate(theirs, edge)


@needs_kernel
def test_a_stored_history_of_other_rules_is_pruned_alike() -> None:
    doc = {
        "segments": [
            {"id": "a", "rule": {"within": "1d", "where": {"field": "type", "equals": "click"}}}
        ]
    }
    ruleset = load(doc)
    native, python = CompiledRules(ruleset), CompiledRules(ruleset, native=False)
    stale: History = {"gone": [NOW - 10.0], "also-gone": []}
    for rules in (native, python):
        history = copy.deepcopy(stale)
        rules.record(history, NOW - 5, rules.matching_traits({"type": "click"}), NOW)
        rules.prune(history, NOW)
        assert list(history) == [next(iter(rules.tests))]


@needs_kernel
def test_a_malformed_history_is_refused_not_misread() -> None:
    rules = CompiledRules(
        load(
            {
                "segments": [
                    {
                        "id": "a",
                        "rule": {"within": "1d", "where": {"field": "type", "equals": "click"}},
                    }
                ]
            }
        )
    )
    test = next(iter(rules.tests))
    with pytest.raises(TypeError, match="not a list"):
        rules.evaluate({test: (NOW,)}, NOW)  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be a dict"):
        rules.prune([], NOW)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rules.evaluate({test: ["yesterday"]}, NOW)


@needs_kernel
def test_the_kernel_refuses_malformed_programs() -> None:
    assert Kernel is not None
    trait = ("t", 0, 1, 60.0, (0,))
    count = (3, 0, 1, -1, 60.0)
    Kernel((trait,), {"t": (((0, 0.0, 0.0),), False)}, (("a", count, None),))  # well formed
    with pytest.raises(ValueError, match="out of range"):
        Kernel((("t", 0, 1, 60.0, (5,)),), {}, (("a", count, None),))
    with pytest.raises(ValueError, match="unknown trait kind"):
        Kernel((("t", 9, 1, 60.0, ()),), {}, ())
    with pytest.raises(ValueError, match="out of range"):
        Kernel((trait,), {"t": (((3, 0.0, 0.0),), False)}, ())
    with pytest.raises(ValueError, match="half-life"):
        Kernel((("t", 3, 2, 60.0, ()),), {"t": (((0, 1.0, 0.0),), False)}, ())
    with pytest.raises(ValueError, match="trait index out of range"):
        Kernel((trait,), {}, (("a", (3, 4, 1, -1, 60.0), None),))
    with pytest.raises(ValueError, match="unknown node"):
        Kernel((trait,), {}, (("a", (42, 0), None),))
    with pytest.raises(TypeError, match="not callable"):
        Kernel((trait,), {}, (("a", (4, "nope"), None),))


@needs_kernel
def test_an_error_in_a_python_leaf_leaves_no_candidate_marked() -> None:
    assert Kernel is not None
    calls: list[float] = []

    def fails_once(history: History, now: float, changes: list[float]) -> bool:
        calls.append(now)
        if len(calls) == 1:
            raise RuntimeError("leaf failed")
        return True

    traits = (("t", 0, 5, 600.0, (0,)), ("u", 0, 5, 600.0, (1,)))
    checks = (("a", (4, fails_once), None), ("b", (3, 1, 1, -1, 600.0), None))
    kernel = Kernel(traits, {}, checks)
    with pytest.raises(RuntimeError, match="leaf failed"):
        kernel.evaluate({"t": [NOW - 1], "u": [NOW - 2]}, NOW)
    # "a" reads only "t": a mark left from the failed call would try it again here.
    assert kernel.evaluate({"u": [NOW - 2]}, NOW) == (["b"], NOW - 2 + 600.0)
    assert calls == [NOW]


@needs_kernel
def test_a_python_leaf_may_evaluate_again() -> None:
    """The candidates are the call's own: a leaf evaluating again (another thread, say)
    does not take them from the call that ran it."""
    assert Kernel is not None
    inner: list[tuple[list[str], float | None]] = []

    def reenters(history: History, now: float, changes: list[float]) -> bool:
        if not inner:
            inner.append(kernel.evaluate({"u": [NOW - 2]}, now))
        return True

    traits = (("t", 0, 5, 600.0, (0,)), ("u", 0, 5, 600.0, (1,)))
    checks = (("a", (4, reenters), None), ("b", (3, 1, 1, -1, 600.0), None))
    kernel = Kernel(traits, {}, checks)
    assert kernel.evaluate({"t": [NOW - 1], "u": [NOW - 2]}, NOW) == (["a", "b"], NOW - 2 + 600)
    assert inner == [(["b"], NOW - 2 + 600)]


@needs_kernel
def test_a_kernel_never_built_refuses_work() -> None:
    assert Kernel is not None
    unbuilt = Kernel.__new__(Kernel)
    for call in (
        lambda: unbuilt.evaluate({}, NOW),
        lambda: unbuilt.prune({}, NOW),
        lambda: unbuilt.record({}, NOW, (), NOW),
    ):
        with pytest.raises(RuntimeError, match="not built"):
            call()
    with pytest.raises(ValueError, match="unknown trait kind"):
        Kernel((("t", 9, 1, 60.0, ()),), {}, ())
