"""The compiled, indexed evaluator agrees with the plain interpreter (segment_rules.interpreter)."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segment_rules import CompiledRules, History, parse_rules
from segment_rules.event_index import EventIndex
from segment_rules.event_memo import MEMO_LIMIT
from segment_rules.fast_match import FAST_LIMIT
from segment_rules.interpreter import Interpreter, decayed_score, event_passes
from segment_rules.model import All, AnyOf, Condition, Not, RuleSet, Score
from tests.rules.strategies import (
    BROAD,
    STEP,
    events,
    predicates,
    rule_files,
    small_taxonomy,
    timed_events,
    urls,
)

NOW = 1_800_000_000.0
TAXONOMY = small_taxonomy()
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(doc: dict[str, Any]) -> RuleSet:
    return parse_rules(yaml.safe_dump(doc, sort_keys=False), "prop.yaml", TAXONOMY)


def _decaying(cond: Condition) -> list[Score]:
    if isinstance(cond, Score):
        return [cond] if cond.half_life is not None else []
    if isinstance(cond, Not):
        return _decaying(cond.part)
    if isinstance(cond, All | AnyOf):
        return [s for p in cond.parts for s in _decaying(p)]
    return []


def _near_threshold(
    ruleset: RuleSet, timed: list[tuple[float, dict[str, Any]]], t: float
) -> set[str]:
    """Segments with a decaying score within rounding of its threshold at ``t``."""
    near = set()
    for seg in ruleset.base_segments:
        assert seg.rule is not None
        for score in _decaying(seg.rule):
            value = decayed_score(score, timed, t, NOW)
            if abs(value - score.at_least) <= 1e-6 * score.at_least:
                near.add(seg.id)
    return near


@PROPERTY
@given(doc=rule_files(), stream=st.data())
def test_compiled_agrees_with_interpreter(doc: dict[str, Any], stream: st.DataObject) -> None:
    ruleset = load(doc)
    compiled, interpreter = CompiledRules(ruleset), Interpreter(ruleset)
    timed = stream.draw(timed_events(NOW))
    history: History = {}
    for ts, event in timed:
        compiled.record(history, ts, compiled.matching_traits(event), NOW, event)
    offsets = stream.draw(st.lists(st.integers(0, 14 * 48), min_size=1, max_size=6))
    times = sorted({NOW + k * STEP for k in offsets})

    for t in times:
        compiled.prune(history, t)
        result = compiled.evaluate(history, t)
        expected = interpreter.members(timed, t, NOW)
        skip = _near_threshold(ruleset, timed, t)
        assert result.members - skip == expected - skip, (t - NOW) / STEP
        assert compiled.with_composites(result.members) == interpreter.with_composites(
            result.members
        )
        # Nothing changes before next_change; ingest sleeps until then.
        if result.next_change is None:
            probes = [t + 30 * 86400.0]
        else:
            assert result.next_change > t
            probes = [t + (result.next_change - t) * f for f in (0.5, 0.999)]
            probes.append(result.next_change - 1e-3)
        for probe in probes:
            skip_probe = skip | _near_threshold(ruleset, timed, probe)
            later = interpreter.members(timed, probe, NOW)
            assert later - skip_probe == result.members - skip_probe, (t - NOW, probe - NOW)


@PROPERTY
@given(
    preds=st.lists(predicates(), min_size=1, max_size=12), sample=st.lists(events(), max_size=15)
)
def test_index_finds_exactly_the_matching_tests(
    preds: list[Any], sample: list[dict[str, Any]]
) -> None:
    doc = {
        "segments": [
            {"id": f"s{n}", "rule": {"within": "1d", "where": p}} for n, p in enumerate(preds)
        ]
    }
    compiled = CompiledRules(load(doc))
    for event in sample:
        found = compiled.matching_traits(event)
        assert len(found) == len(set(found))
        expected = {tid for tid, pred in compiled.tests.items() if event_passes(pred, event)}
        assert set(found) == expected, event


@PROPERTY
@given(
    preds=st.lists(predicates(), min_size=1, max_size=12),
    pool=st.lists(events(), min_size=1, max_size=6),
    order=st.lists(st.integers(0, 5), max_size=40),
    limit=st.sampled_from([1, 2, 3, MEMO_LIMIT]),
    fast_limit=st.sampled_from([1, 40, 200, FAST_LIMIT]),
    accelerate=st.booleans(),
)
def test_memoised_answers_agree_on_repeating_streams(
    preds: list[Any],
    pool: list[dict[str, Any]],
    order: list[int],
    limit: int,
    fast_limit: int,
    accelerate: bool,
) -> None:
    """Events that repeat (in full or in the fields the tests read) are answered from the
    memos, which are also evicted (tiny limits): answers stay exact, from the generated
    Python alone and from the compiled matcher in front of it (which forgets everything
    when its ids pass ``fast_limit``)."""
    doc = {
        "segments": [
            {"id": f"s{n}", "rule": {"within": "1d", "where": p}} for n, p in enumerate(preds)
        ]
    }
    tests = CompiledRules(load(doc)).tests
    index = EventIndex(tests, memo_limit=limit, accelerate=accelerate, fast_limit=fast_limit)
    for n in order:
        event = copy.deepcopy(pool[n % len(pool)])  # equal values, not the same objects
        found = index.match(event)
        assert len(found) == len(set(found))
        expected = {tid for tid, pred in tests.items() if event_passes(pred, event)}
        assert set(found) == expected, event
    assert all(len(memo) <= limit for memo in index.memos)


URL_TESTS = [
    {"field": "url", "host": "cars.example"},
    {"field": "url", "host_suffix": "cars.example"},
    {"field": "url", "path_prefix": "/mo"},
    {"field": "url", "path_prefix": "/models/"},
    {"field": "url", "prefix": "https://www.cars"},
    {"field": "url", "exists": True},
]


@PROPERTY
@given(
    preds=st.lists(st.sampled_from(URL_TESTS), min_size=1, max_size=4),
    pool=st.lists(urls(), min_size=1, max_size=8),
    order=st.lists(st.integers(0, 7), max_size=40),
)
def test_memoised_url_cut_keeps_what_url_tests_read(
    preds: list[Any], pool: list[str], order: list[int]
) -> None:
    doc = {
        "segments": [
            {"id": f"s{n}", "rule": {"within": "1d", "where": {"all": [BROAD[0], p]}}}
            for n, p in enumerate(preds)
        ]
    }
    tests = CompiledRules(load(doc)).tests
    index = EventIndex(tests)
    for n in order:
        event = {"type": "page_view", "url": pool[n % len(pool)]}
        expected = {tid for tid, pred in tests.items() if event_passes(pred, event)}
        assert set(index.match(event)) == expected, event


@PROPERTY
@given(doc=rule_files(), stream=st.data())
def test_history_survives_json_and_pruning_is_invisible(
    doc: dict[str, Any], stream: st.DataObject
) -> None:
    import orjson

    ruleset = load(doc)
    compiled = CompiledRules(ruleset)
    timed = stream.draw(timed_events(NOW))
    history: History = {}
    for ts, event in timed:
        compiled.record(history, ts, compiled.matching_traits(event), NOW, event)
    t = NOW + stream.draw(st.integers(0, 10 * 48)) * STEP
    before = compiled.evaluate(history, t)
    restored = orjson.loads(orjson.dumps(history))
    compiled.prune(restored, t)
    assert compiled.evaluate(restored, t) == before
    for tid, state in restored.items():
        trait = next(tr for tr in compiled.traits if tr.id == tid)
        assert len(state) <= max(trait.keep, 2)


ONE_FIELD = [("type",), ("categories",), ("url",), ("geo",), ("geo", "country")]
ONE_FIELD += [("geo", "region"), ("geo", "metro"), ("attrs", "cart_value"), ("attrs", "plan")]
ONE_FIELD += [("attrs", "query"), ("attrs", "ids")]


def _with_field(event: dict[str, Any], path: tuple[str, ...], source: dict[str, Any]) -> Any:
    """``event`` with the field at ``path`` taken from ``source`` (or removed if absent)."""
    out = copy.deepcopy(event)
    node: dict[str, Any] = out
    src: Any = source
    for key in path[:-1]:
        src = src.get(key) if isinstance(src, dict) else None
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    value = src.get(path[-1]) if isinstance(src, dict) else None
    if value is None:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = copy.deepcopy(value)
    return out


@PROPERTY
@given(
    preds=st.lists(predicates(), min_size=1, max_size=12),
    base=events(),
    edits=st.lists(st.tuples(st.sampled_from(ONE_FIELD), events()), min_size=1, max_size=6),
    order=st.lists(st.integers(0, 6), max_size=40),
    limit=st.sampled_from([1, 2, MEMO_LIMIT]),
    accelerate=st.booleans(),
)
def test_memoised_answers_agree_on_near_repeats(
    preds: list[Any],
    base: dict[str, Any],
    edits: list[tuple[tuple[str, ...], dict[str, Any]]],
    order: list[int],
    limit: int,
    accelerate: bool,
) -> None:
    """Events equal in every field the tests read but one: a memo keyed on too few of the
    fields (or on a projection that loses one) would answer one of them with another's."""
    doc = {
        "segments": [
            {"id": f"s{n}", "rule": {"within": "1d", "where": p}} for n, p in enumerate(preds)
        ]
    }
    tests = CompiledRules(load(doc)).tests
    index = EventIndex(tests, memo_limit=limit, accelerate=accelerate)
    pool = [base] + [_with_field(base, path, source) for path, source in edits]
    for n in order:
        event = copy.deepcopy(pool[n % len(pool)])
        found = index.match(event)
        assert len(found) == len(set(found))
        expected = {tid for tid, pred in tests.items() if event_passes(pred, event)}
        assert set(found) == expected, event
    assert all(len(memo) <= limit for memo in index.memos)
