"""The compiled matcher (segment_rules/_fastmatch.c) in front of the generated Python.

Every answer is checked against the plain interpreter; the counters (`stats()`) show which
way an event went: answered from the tables (`hits`), a group's matcher called for a key
never seen (`fills`), or the generated Python for what the tables do not keep
(`fallbacks`). The property tests in test_properties.py run it on random rules and events.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from segment_rules import CompiledRules, fast_match, parse_rules
from segment_rules.event_index import EventIndex, _conjuncts
from segment_rules.fast_match import Matcher, elementwise
from segment_rules.interpreter import event_passes
from segment_rules.model import FieldTest


def rules_of(wheres: list[str]) -> CompiledRules:
    lines = ["segments:"]
    for n, where in enumerate(wheres):
        lines.append(f"  - id: s{n}\n    rule: {{within: 1d, where: {where}}}")
    return CompiledRules(parse_rules("\n".join(lines) + "\n"))


class Built:
    """An index and the tests it was built from (what every answer is checked against)."""

    def __init__(self, wheres: list[str], fast_limit: int = fast_match.FAST_LIMIT) -> None:
        self.tests = rules_of(wheres).tests
        self.index = EventIndex(self.tests, fast_limit=fast_limit)
        self.match = self.index.match


def build(wheres: list[str], fast_limit: int = fast_match.FAST_LIMIT) -> Built:
    return Built(wheres, fast_limit)


def check(built: Built, events: list[dict[str, Any]], rounds: int = 2) -> None:
    for event in events * rounds:
        found = built.match(event)
        assert len(found) == len(set(found)), event
        expected = {tid for tid, pred in built.tests.items() if event_passes(pred, event)}
        assert set(found) == expected, event


def stats(built: Built) -> dict[str, int]:
    result: dict[str, int] = built.match.stats()  # type: ignore[attr-defined]  # typed as a plain callable
    return result


def test_the_compiled_matcher_is_built_and_used() -> None:
    # pip install -e . builds it (setup.py); without it matching is ~1.8x slower (0011).
    assert Matcher is not None
    assert isinstance(build(["{field: categories, under: auto}"]).match, Matcher)


def test_pure_python_when_asked() -> None:
    tests = rules_of(["{field: categories, under: auto}"]).tests
    index = EventIndex(tests, accelerate=False)
    assert not isinstance(index.match, Matcher)
    assert index.match is index.python_match


def test_lists_are_answered_per_element() -> None:
    built = build(
        [
            "{field: categories, under: auto}",
            "{field: categories, equals: news}",
            "{any: [{field: categories, prefix: trav}, {field: categories, equals: food}]}",
        ]
    )
    lists = [["auto/suv", "news"], ["news", "auto"], ["food", "travel/air", "auto/suv"]]
    lists += [["news", "news"], [], ["auto/suv", "auto", "auto/suv/x"]]
    check(built, [{"type": "page_view", "categories": c} for c in lists])
    check(built, [{"type": "page_view", "categories": "news"}, {"type": "page_view"}])
    # Six distinct categories: one fill each, whatever lists they came in.
    assert stats(built)["fills"] == 6
    assert stats(built)["fallbacks"] == 0


def test_a_conjunction_on_one_list_is_not_split_by_element() -> None:
    # Both parts can hold on different elements: the union of per-element answers would
    # miss it, so the group is keyed on the whole list.
    where = "{all: [{field: categories, under: auto}, {field: categories, under: news}]}"
    built = build([where, "{not: {field: categories, equals: news}}"])
    check(built, [{"categories": ["auto/suv", "news"]}, {"categories": ["news", "auto/suv"]}])
    check(built, [{"categories": ["auto"]}, {"categories": ["news"]}, {"categories": []}])


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"field": "categories", "under": "auto"}, True),
        (
            {"any": [{"field": "categories", "under": "a"}, {"field": "categories", "in": ["b"]}]},
            True,
        ),
        ({"field": "categories", "not_in": ["news"]}, False),
        ({"field": "categories", "exists": True}, False),
        ({"not": {"field": "categories", "equals": "news"}}, False),
        (
            {"all": [{"field": "categories", "under": "a"}, {"field": "categories", "under": "b"}]},
            False,
        ),
    ],
)
def test_which_groups_are_elementwise(where: dict[str, Any], expected: bool) -> None:
    doc = {"segments": [{"id": "s", "rule": {"within": "1d", "where": where}}]}
    (pred,) = CompiledRules(parse_rules(yaml.safe_dump(doc))).tests.values()
    paths = tuple(sorted({t.path for t in _field_tests_of(pred)}))
    assert elementwise(paths, [("t", _conjuncts(pred))]) is expected


def _field_tests_of(pred: Any) -> list[FieldTest]:
    if isinstance(pred, FieldTest):
        return [pred]
    if hasattr(pred, "part"):
        return _field_tests_of(pred.part)
    return [t for p in pred.parts for t in _field_tests_of(p)]


def test_urls_are_cut_to_what_path_prefixes_can_tell_apart() -> None:
    built = build(
        [
            "{all: [{field: url, host_suffix: a.example}, {field: url, path_prefix: /models/}]}",
            "{field: url, path_prefix: /mo}",
            "{field: url, prefix: 'https://a.example/de'}",
        ]
    )
    items = [{"type": "page_view", "url": f"https://a.example/item-{n}"} for n in range(50)]
    check(built, items)
    # None of the path prefixes starts '/i': every /item-N is one key.
    assert stats(built)["fills"] <= 2
    check(
        built,
        [
            {"url": u}
            for u in (
                "https://a.example/models/1",
                "https://a.example/models",
                "https://a.example/mo",
                "https://a.example/m",
                "https://a.example/",
                "https://b.a.example/models/x",
                "https://a.example.evil/models/",
                "https://a.example/dealers",
                "https://a.example/d",
                "http://a.example/models/",
                "https://a.example?/models/",
                "https://a.example#/models/",
            )
        ],
    )


def test_what_the_tables_do_not_keep_goes_to_the_python() -> None:
    built = build(
        [
            "{field: url, host: a.example}",
            "{field: attrs.v, lt: 50}",
            "{field: attrs.v, equals: 1}",
            "{field: categories, under: auto}",
        ]
    )
    odd: list[dict[str, Any]] = [
        {"url": "a.example/no-scheme"},
        {"url": "https://a.example"},  # no '/' after the host
        {"url": ["https://a.example/"]},
        {"attrs": {"v": 1}},
        {"attrs": {"v": True}},
        {"attrs": {"v": 1.0}},
        {"categories": [7, "auto"]},
        {"categories": {"auto": 1}},
        {"type": ["page_view"]},
        {"type": 3},
    ]
    before = stats(built)["fallbacks"]
    check(built, odd, rounds=1)
    assert stats(built)["fallbacks"] - before == len(odd)
    check(built, [{"attrs": {"v": "1"}}, {"attrs": None}, {"geo": "x"}, {}], rounds=1)
    assert stats(built)["fallbacks"] - before == len(odd)


def test_nested_fields_share_their_parent() -> None:
    built = build(
        [
            "{all: [{field: geo.country, equals: USA}, {field: geo.metro, in: ['803', '501']}]}",
            "{field: geo.region, equals: CA}",
            "{field: geo.zip, exists: true}",
        ]
    )
    events: list[dict[str, Any]] = [
        {"geo": {"country": "USA", "metro": "803", "region": "CA", "zip": "90210"}},
        {"geo": {"country": "USA", "metro": "500"}},
        {"geo": {"country": "CAN", "metro": "803"}},
        {"geo": {"region": "CA"}},
        {"geo": "USA"},
        {"geo": None},
        {},
    ]
    check(built, events)


def test_everything_is_forgotten_past_the_limit_and_answers_stay_exact() -> None:
    built = build(["{field: categories, under: auto}", "{field: geo.region, equals: CA}"], 40)
    events = [
        {"categories": [f"auto/m{n}", f"x{n}"], "geo": {"region": "CA" if n % 2 else f"R{n}"}}
        for n in range(60)
    ]
    check(built, events)
    assert stats(built)["clears"] > 0
    assert stats(built)["ids"] <= 40 + 10  # an event may pass the limit; never more


def test_a_filler_error_reaches_the_caller() -> None:
    def fallback(event: Any) -> tuple[str, ...]:
        return ()

    def broken(event: Any) -> tuple[str, ...]:
        raise ValueError("boom")

    field = (("categories",), False, (), ())
    matcher = Matcher(((((field,), (((0,), True, broken),), ()),)), {}, 0, fallback)
    with pytest.raises(ValueError, match="boom"):
        matcher({"categories": ["a"]})
    assert matcher({"categories": []}) == ()


def _one_group(fill: Any, fallback: Any = None, **kwargs: Any) -> Matcher:
    """A matcher of one elementwise group reading `categories`, built by hand."""
    field = (("categories",), False, (), ())
    branches = (((field,), (((0,), True, fill),), ()),)
    return Matcher(branches, {}, 0, fallback or (lambda event: ("fallback",)), **kwargs)


def test_paths_of_any_depth() -> None:
    # attrs.<name> is free-form: a rule may name a path deeper than any fixed bound, and
    # building the index must not fail for it.
    deep = "attrs." + ".".join(f"k{n}" for n in range(20))
    built = build([f"{{field: {deep}, equals: x}}", "{field: attrs.k0.z, equals: y}"])
    leaf: Any = "x"
    for key in reversed(deep.split(".")):
        leaf = {key: leaf}
    leaf["attrs"]["k0"]["z"] = "y"
    check(built, [leaf, {"attrs": {"k0": {"z": "y"}}}, {"attrs": {"k0": "x"}}])
    assert stats(built)["fallbacks"] == 0


def test_a_spec_given_by_keyword_is_kept_alive() -> None:
    import gc
    import weakref

    def fill(element: Any) -> tuple[str, ...]:
        return ("t",)

    alive = weakref.ref(fill)
    field = (("categories",), False, (), ())
    matcher = Matcher(
        branches=((((field,), (((0,), True, fill),), ()),)),
        branch_of={},
        default_branch=0,
        fallback=lambda event: (),
    )
    del fill
    gc.collect()
    assert alive() is not None
    assert matcher({"categories": ["a"]}) == ("t",)


def test_a_failed_init_leaves_nothing_callable() -> None:
    matcher = Matcher.__new__(Matcher)
    field = (("categories",), False, (), ())
    with pytest.raises(ValueError, match="bad field index"):
        matcher.__init__(((((field,), (((5,), True, print),), ()),)), {}, 0, print)  # type: ignore[misc]  # __init__ called by hand, to fail it
    with pytest.raises(TypeError):
        matcher({"categories": ["a"]})


def test_branch_numbers_are_checked_once_and_kept() -> None:
    field = (("categories",), False, (), ())
    branch_of = {"page_view": 0}
    matcher = Matcher(
        ((((field,), (((0,), True, lambda e: ("t",)),), ()),)), branch_of, 0, lambda e: ()
    )
    branch_of["click"] = 1 << 40  # no such branch: changing the dict changes nothing
    assert matcher({"type": "click", "categories": ["a"]}) == ("t",)


@pytest.mark.parametrize("limit", [-1, 1 << 32, (1 << 32) + 5])
def test_a_limit_out_of_range_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        _one_group(lambda e: (), limit=limit)


def _short_of_memory(matcher: Matcher, event: dict[str, Any]) -> BaseException | None:
    """What matching ``event`` raises when the next allocation fails (_testcapi's hooks)."""
    testcapi = pytest.importorskip("_testcapi")
    testcapi.set_nomemory(0, 1)
    try:
        matcher(event)
    except BaseException as error:  # whatever it is, the test shows it
        return error
    finally:
        testcapi.remove_mem_hooks()
    return None


def test_out_of_memory_raises_memory_error() -> None:
    matcher = _one_group(lambda e: ("t",), limit=10)
    long_text = {"categories": ["a" * 100]}  # copied out of the slot: an allocation
    assert isinstance(_short_of_memory(matcher, long_text), MemoryError)
    assert matcher(long_text) == ("t",)


def test_a_reset_short_of_memory_keeps_the_old_tables() -> None:
    matcher = _one_group(lambda e: ("t",), limit=10)
    for n in range(12):  # past the limit: the next event resets the tables
        matcher({"categories": [f"c{n}"]})
    event = {"categories": ["b"]}
    assert isinstance(_short_of_memory(matcher, event), MemoryError)  # the reset's tables
    # The old tables were kept: the next event resets them and is answered.
    assert matcher(event) == ("t",)
    assert matcher({"categories": ["a" * 100, "b"]}) == ("t",)


def test_a_filler_changing_the_event_is_caught() -> None:
    # An elementwise group reads its list's elements after the fillers of earlier groups
    # (Python) ran: a changed list must not be read past its end nor answered as it is now.
    field = (("categories",), False, (), ())
    answers = {"a": ("ta",), "b": ("tb",)}

    def run(change: Any) -> Matcher:
        def whole(event: Any) -> tuple[str, ...]:
            change(event["categories"])
            return ()

        def each(element: Any) -> tuple[str, ...]:
            return answers.get(element, ())

        groups = (((0,), False, whole), ((0,), True, each))
        return Matcher(((((field,), groups, ()),)), {}, 0, lambda e: ())

    matcher = run(lambda found: found.clear())
    with pytest.raises(RuntimeError, match="changed"):
        matcher({"categories": ["a", "c"]})
    matcher = run(lambda found: found.__setitem__(0, "b"))
    with pytest.raises(RuntimeError, match="changed"):
        matcher({"categories": ["a"]})


_M64 = (1 << 64) - 1


def _unmix(h: int) -> int:
    """The inverse of _fastmatch.c's mix() (before this fix, its text hash's finaliser)."""

    def unshift(x: int) -> int:
        return x ^ (x >> 33)  # its own inverse: 33 >= 64 / 2

    h = unshift(h)
    h = (h * pow(0xC4CEB9FE1A85EC53, -1, 1 << 64)) & _M64
    h = unshift(h)
    h = (h * pow(0xFF51AFD7ED558CCD, -1, 1 << 64)) & _M64
    return unshift(h)


def _same_hash_texts(pairs: int) -> list[str]:
    """2**pairs latin-1 texts of one unkeyed-hash value: in each pair of 8-byte words, the
    mixed words of one text differ from another's in their top bit only, which multiplying
    by an odd number keeps to the top bit, and the second word takes it back."""
    import random

    rng = random.Random(7)
    blocks = [(rng.getrandbits(64), rng.getrandbits(64)) for _ in range(pairs)]
    top = 1 << 63
    texts = []
    for choice in range(1 << pairs):
        words = []
        for n, (a, b) in enumerate(blocks):
            flip = top if choice >> n & 1 else 0
            words += [_unmix(a ^ flip), _unmix(b ^ flip)]
        data = b"".join(w.to_bytes(8, "little") for w in words)
        texts.append(data.decode("latin-1"))
    return texts


def test_texts_from_outside_do_not_share_a_probe_chain() -> None:
    # Categories, URLs and attrs come from senders: a hash they can compute lets them send
    # texts that all fall in one chain, each new text walking all the others.
    texts = _same_hash_texts(11)
    matcher = _one_group(lambda e: ())
    for start in range(0, len(texts), 64):
        matcher({"categories": texts[start : start + 64]})
    assert matcher.stats()["texts"] == len(texts)
    assert matcher.stats()["probes"] < 10 * len(texts)


def test_fields_no_test_reads_as_a_url_are_kept_whole() -> None:
    # Read only by prefix, exists or missing: no URL cut, so text that is not an http(s)
    # URL (a query, categories) is answered from the tables, not by the generated Python.
    built = build(
        [
            "{field: attrs.q, prefix: buy}",
            "{field: categories, prefix: trav}",
            "{field: geo.zip, exists: true}",
            "{field: geo.metro, missing: true}",
        ]
    )
    events: list[dict[str, Any]] = [
        {"type": "search", "attrs": {"q": "buy shoes"}, "geo": {"zip": "90210"}},
        {"attrs": {"q": "sell"}, "categories": ["travel/air", "news"], "geo": {"metro": "803"}},
        {"categories": "travel", "attrs": {"q": "https://a.example/x"}},
    ]
    check(built, events)
    assert stats(built)["fallbacks"] == 0
