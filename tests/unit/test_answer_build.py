"""The compiled cache-miss path (dmp/_answers.c) against the Python answers and references.

The replica's answers are checked three ways on random rule files and memberships: the C
builder, the Python plan (``compiled=False``) and a plain evaluation of the parsed rules
here. ``find_position`` is checked against ``bisect``; the builder's guards one by one.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmp import answer_build
from dmp.answer_build import composite_program, rank_table
from dmp.ids import position, uid_hash
from dmp.replica import INACTIVE, MAX_SLOTS, AnswerPlan, IdIndex, Replica
from segment_rules import CompiledRules, parse_rules
from segment_rules.model import All, Composite, Not, RuleSet, SegmentRef

# The builder's opcodes: answer_build holds them, built or not, outside its __all__.
OP_REF, OP_FALSE, OP_NOT, OP_AND, OP_OR, OP_SET = (
    int(vars(answer_build)[op])
    for op in ("OP_REF", "OP_FALSE", "OP_NOT", "OP_AND", "OP_OR", "OP_SET")
)
U64_MAX = 2**64 - 1
# Every example is generated from the same seed: the same cases on every run.
PROPERTY = settings(max_examples=120, deadline=None, derandomize=True, database=None)


def needs_extension() -> None:
    if not answer_build.available():
        pytest.skip("dmp._answers is not built (pip install -e . builds it)")


# -- Random rule files --------------------------------------------------------------------

Expr = str | Mapping[str, object]


def holds_on_nothing(expr: object) -> bool:
    """What segment_rules.graph refuses: a composite a cookie in no segment would satisfy."""
    if isinstance(expr, str):
        return False
    assert isinstance(expr, Mapping)
    ((op, arg),) = expr.items()
    if op == "not":
        return not holds_on_nothing(arg)
    assert isinstance(arg, list)
    results = [holds_on_nothing(part) for part in arg]
    return all(results) if op == "and" else any(results)


def expressions(refs: Sequence[str]) -> st.SearchStrategy[Expr]:
    def compound(parts: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
        listed = st.lists(parts, min_size=1, max_size=3)
        return st.one_of(
            parts.map(lambda part: {"not": part}),
            listed.map(lambda ps: {"and": ps}),
            listed.map(lambda ps: {"or": ps}),
        )

    return st.recursive(st.sampled_from(list(refs)), compound, max_leaves=6)


@dataclass(frozen=True)
class RuleFile:
    text: str
    base_ids: tuple[str, ...]
    composite_ids: tuple[str, ...]


@st.composite
def rule_files(draw: st.DrawFn) -> RuleFile:
    """Base and composite segments, some paused, composites of composites, in a random
    file order (a composite may come before what it refers to)."""
    base = [f"b{n}" for n in range(draw(st.integers(1, 5)))]
    composites: dict[str, Expr] = {}
    for n in range(draw(st.integers(0, 5))):
        refs = base + list(composites)
        expr = draw(expressions(refs))
        if holds_on_nothing(expr):
            expr = {"and": [draw(st.sampled_from(refs)), expr]}
        composites[f"c{n}"] = expr
    order = draw(st.permutations(base + list(composites)))
    lines = ["segments:"]
    for seg_id in order:
        lines.append(f"  - id: {seg_id}")
        if draw(st.integers(0, 3)) == 0:
            lines.append("    status: paused")
        if seg_id in composites:
            lines.append(f"    of: {json.dumps(composites[seg_id])}")
        else:
            at_least = int(seg_id[1:]) + 1  # distinct rules: no duplicate warnings
            lines.append(
                f"    rule: {{at_least: {at_least}, within: 1d, "
                "where: {field: type, equals: click}}"
            )
    return RuleFile("\n".join(lines) + "\n", tuple(base), tuple(composites))


def expected_answer(ruleset: RuleSet, stored: set[str]) -> list[str]:
    """The answer straight from the parsed rules: active segments held, in file order."""
    by_id = {s.id: s for s in ruleset.segments}
    base = {i for i in stored if i in by_id and by_id[i].of is None and by_id[i].status == "active"}
    if not base:
        return []
    memo: dict[str, bool] = {}

    def holds(seg_id: str) -> bool:
        if seg_id not in memo:
            seg = by_id[seg_id]
            if seg.status != "active":
                memo[seg_id] = False
            elif seg.of is None:
                memo[seg_id] = seg_id in base
            else:
                memo[seg_id] = evaluate(seg.of)
        return memo[seg_id]

    def evaluate(node: Composite) -> bool:
        if isinstance(node, SegmentRef):
            return holds(node.segment_id)
        if isinstance(node, Not):
            return not evaluate(node.part)
        results = [evaluate(part) for part in node.parts]
        return all(results) if isinstance(node, All) else any(results)

    return [s.id for s in ruleset.segments if holds(s.id)]


# -- Random memberships ---------------------------------------------------------------------

# Stored names beyond the rule file's base segments: segments since deleted, and a
# composite's id (a base segment that became a composite): none may ever be answered.
STALE = ("gone", "b5", "c0", "c1")
# Cookie ids, some needing JSON escapes in the lookup's document; "unknown" is never learned.
UIDS = ["u0", "u1", "u2", 'q"3', "back\\4", "caf\u00e9", "\U0001f6805", "u7"]
COOKIES = len(UIDS)


@st.composite
def memberships(draw: st.DrawFn, base_ids: Sequence[str]) -> list[tuple[str, str, bool]]:
    """(uid, stored segment id, add or remove) changes for a few cookies."""
    names = st.one_of(st.sampled_from(list(base_ids)), st.sampled_from(STALE))
    uids = st.sampled_from(UIDS)
    changes = st.tuples(uids, names, st.integers(0, 4).map(bool))
    return draw(st.lists(changes, min_size=draw(st.integers(0, 20)), max_size=50))


@st.composite
def uid_positions(draw: st.DrawFn) -> dict[str, int]:
    """Cookies at random positions in two partitions, often next to each other (a run
    ends where the next cookie's begins)."""
    size = st.lists(st.integers(0, 20), min_size=COOKIES, max_size=COOKIES, unique=True)
    locals_ = draw(size)
    partitions = draw(st.lists(st.integers(0, 1), min_size=COOKIES, max_size=COOKIES))
    return {uid: position(partitions[n], locals_[n]) for n, uid in enumerate(UIDS)}


class Pair:
    """The C and the Python replicas, changed alike, plus what each cookie holds."""

    def __init__(self, rules: CompiledRules, positions: dict[str, int]) -> None:
        self.compiled = Replica(rules, compiled=True)
        self.python = Replica(rules, compiled=False)
        self.positions = positions
        self.stored: dict[str, set[str]] = {uid: set() for uid in positions}
        for replica in (self.compiled, self.python):
            replica.add_ids((pos, uid_hash(uid)) for uid, pos in positions.items())

    def apply(self, changes: Sequence[tuple[str, str, bool]]) -> None:
        for uid, seg_id, add in changes:
            pos = [self.positions[uid]]
            for replica in (self.compiled, self.python):
                (replica.add if add else replica.remove)(seg_id, pos)
            (self.stored[uid].add if add else self.stored[uid].discard)(seg_id)

    def check(self, ruleset: RuleSet) -> None:
        for n, uid in enumerate([*self.positions, "unknown"]):
            want = expected_answer(ruleset, self.stored.get(uid, set()))
            document = orjson.dumps({"uid": uid, "segments": want})
            answer = (want, document, document)
            # The first call builds the answer, the others read the cache: in both orders.
            for json_first in (n % 2 == 0, n % 2 == 1):
                assert answers(self.compiled, uid, json_first) == answer, uid
                assert answers(self.python, uid, json_first) == answer, uid


def answers(replica: Replica, uid: str, json_first: bool) -> tuple[list[str], bytes, bytes]:
    """segments, the document asked twice, of one cookie (document or segments first)."""
    if json_first:
        document, again = replica.document(uid), replica.document(uid)
        names = replica.segments(uid)
    else:
        names = replica.segments(uid)
        document, again = replica.document(uid), replica.document(uid)
    # Each segment once: the partner view relies on it (PartnerProfile.view, distinct=True).
    assert len(set(names)) == len(names), names
    return names, again, document


@PROPERTY
@given(st.data())
def test_compiled_and_python_replicas_answer_alike(data: st.DataObject) -> None:
    needs_extension()
    first = data.draw(rule_files(), "rules")
    ruleset = parse_rules(first.text, "first.yaml")
    pair = Pair(CompiledRules(ruleset), data.draw(uid_positions(), "positions"))
    # The C side really answers (a private look, as test_replica's at the cache).
    assert pair.compiled._plan.builder is not None
    assert pair.python._plan.builder is None
    pair.apply(data.draw(memberships(first.base_ids), "memberships"))
    pair.check(ruleset)
    # Changes after answers were cached (new slots too: the rank table is rebuilt).
    pair.apply(data.draw(memberships(first.base_ids), "changes"))
    pair.check(ruleset)
    # Another rule version over the same memberships.
    second = data.draw(rule_files(), "new rules")
    ruleset = parse_rules(second.text, "second.yaml")
    rules = CompiledRules(ruleset)
    pair.compiled.set_rules(rules)
    pair.python.set_rules(rules)
    pair.check(ruleset)


# A base segment and a paused one, which the composites below refer to.
A_AND_PAUSED_P = """segments:
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: p
    status: paused
    rule: {within: 1d, where: {field: type, equals: search}}
"""


def test_a_cookie_in_nothing_active_gets_no_composite() -> None:
    needs_extension()
    text = (
        A_AND_PAUSED_P
        + """  - id: a_not_p
    of: {and: [a, {not: p}]}
  - id: deep
    of: {or: [a_not_p, p]}
"""
    )
    rules = CompiledRules(parse_rules(text))
    for compiled in (True, False):
        replica = Replica(rules, compiled=compiled)
        replica.add_ids([(position(0, 1), uid_hash("in-p")), (position(0, 2), uid_hash("in-a"))])
        replica.add("p", [position(0, 1)])
        replica.add("gone", [position(0, 1)])
        replica.add("a", [position(0, 2)])
        assert replica.segments("in-p") == []
        assert replica.document("in-p") == b'{"uid":"in-p","segments":[]}'
        assert replica.segments("in-a") == ["a", "a_not_p", "deep"]
        assert replica.document("in-a") == b'{"uid":"in-a","segments":["a","a_not_p","deep"]}'


# -- find_position --------------------------------------------------------------------------

EMPTY_BUCKETS = np.empty(0, dtype=np.uint32)


def reference_position(hashes: Sequence[int], positions: Sequence[int], h: int) -> int | None:
    i = bisect_right(hashes, h) - 1
    return positions[i] if i >= 0 and hashes[i] == h else None


def bucket_starts(hashes: Sequence[int], shift: int) -> npt.NDArray[np.uint32]:
    """``starts[k]``: the first index whose hash >> shift is k or more (by bisect)."""
    keys = [h >> shift for h in hashes]
    count = 1 << (64 - shift)
    return np.array([bisect_right(keys, k - 1) for k in range(count + 1)], dtype=np.uint32)


def u64(values: Sequence[int]) -> npt.NDArray[np.uint64]:
    return np.array(values, dtype=np.uint64)


HASHES = st.one_of(
    st.sampled_from([0, 1, 2, 2**63 - 1, 2**63, 2**64 - 2, U64_MAX]),
    st.integers(0, 20),
    st.integers(0, U64_MAX),
)


@PROPERTY
@given(
    st.lists(HASHES, max_size=40),
    st.lists(HASHES, min_size=1, max_size=10),
    st.sampled_from([64, 63, 60, 58]),
)
def test_find_position_is_the_last_equal_hash(
    hashes: list[int], probes: list[int], shift: int
) -> None:
    needs_extension()
    assert answer_build.find_position is not None
    hashes.sort()
    positions = [n * 7 + 3 for n in range(len(hashes))]  # tells duplicates apart
    buckets = EMPTY_BUCKETS if shift == 64 else bucket_starts(hashes, shift)
    for h in [*probes, *hashes, 0, U64_MAX]:
        got = answer_build.find_position(u64(hashes), u64(positions), buckets, shift, h)
        assert got == reference_position(hashes, positions, h), h


def test_find_position_on_an_empty_array() -> None:
    needs_extension()
    assert answer_build.find_position is not None
    empty = u64([])
    for h in (0, 5, U64_MAX):
        assert answer_build.find_position(empty, empty, EMPTY_BUCKETS, 64, h) is None
    buckets = np.zeros(3, dtype=np.uint32)  # shift 63: two buckets, both empty
    assert answer_build.find_position(empty, empty, buckets, 63, U64_MAX) is None


ID_CHANGES = st.lists(
    st.tuples(st.booleans(), st.lists(st.tuples(HASHES, st.integers(0, 2**40)), max_size=12)),
    max_size=8,
)


@PROPERTY
@given(ID_CHANGES)
def test_id_index_later_entry_wins(changes: list[tuple[bool, list[tuple[int, int]]]]) -> None:
    # Bulk loads and single adds mixed, as the replica learns ids: the latest entry wins.
    index, want = IdIndex(), dict[int, int]()
    for bulk, pairs in changes:
        if bulk:
            index.extend(u64([h for h, _ in pairs]), u64([p for _, p in pairs]))
        else:
            for h, p in pairs:
                index.add(h, p)
        want.update(pairs)
    for h in {0, U64_MAX, *want}:
        assert index.get(h) == want.get(h), h


def test_find_position_refuses_wrong_arrays() -> None:
    needs_extension()
    find = answer_build.find_position
    assert find is not None
    good = u64([1, 2, 3])
    for wrong in (
        np.array([1, 2, 3], dtype=np.int64),
        np.array([1, 2, 3], dtype=np.float64),
        np.array([1, 2, 3], dtype=np.uint32),
        [1, 2, 3],
    ):
        with pytest.raises(TypeError):
            find(wrong, good, EMPTY_BUCKETS, 64, 2)
        with pytest.raises(TypeError):
            find(good, wrong, EMPTY_BUCKETS, 64, 2)
    with pytest.raises(TypeError):
        find(good, good, np.zeros(3, dtype=np.int64), 63, 2)
    with pytest.raises(ValueError, match="differ in length"):
        find(good, u64([1, 2]), EMPTY_BUCKETS, 64, 2)
    with pytest.raises(ValueError, match="shift"):
        find(good, good, np.zeros(4, dtype=np.uint32), 63, 2)  # 63 needs 3 entries
    with pytest.raises(ValueError, match="shift"):
        find(good, good, np.zeros(3, dtype=np.uint32), 64, 2)
    with pytest.raises(ValueError, match="out of range"):
        find(good, good, np.array([0, 9, 9], dtype=np.uint32), 63, 2)
    with pytest.raises(ValueError, match="out of range"):
        find(good, good, np.array([2, 1, 3], dtype=np.uint32), 63, 2)
    with pytest.raises((TypeError, ValueError, BufferError)):
        find(u64([1, 2, 3, 4, 5, 6])[::2], good, EMPTY_BUCKETS, 64, 2)


# -- AnswerBuilder --------------------------------------------------------------------------

NAMES = ["s0", "s1", "s2", "s3"]


def program(*ops: int) -> bytes:
    return array("i", ops).tobytes()


def builder(names: Sequence[str] = NAMES, prog: bytes = b"") -> answer_build.AnswerBuilder:
    assert answer_build.AnswerBuilder is not None
    return answer_build.AnswerBuilder(names, [orjson.dumps(n) for n in names], prog)


START = 5 << 12  # the cookie at local 5


def run(slots: Sequence[int]) -> Iterator[int]:
    return iter([START + s for s in slots])


@pytest.mark.parametrize(
    "ops",
    [
        (99,),  # no such opcode
        (-1,),
        (OP_REF, 4, OP_SET, 0),  # rank past the names
        (OP_REF, -1, OP_SET, 0),
        (OP_REF, 0, OP_SET, 4),
        (OP_REF, 0, OP_SET, -1),
        (OP_REF, 0, OP_AND, 2, OP_SET, 1),  # AND of more than the stack holds
        (OP_REF, 0, OP_OR, -1, OP_SET, 1),
        (OP_NOT, OP_SET, 1),  # underflow
        (OP_SET, 1),
        (OP_REF, 0),  # left on the stack
        (OP_REF, 0, OP_REF, 1, OP_SET, 2),  # SET with two on the stack
        (OP_REF, 0, OP_SET, 1, OP_FALSE),
        (OP_REF,),  # truncated operands
        (OP_REF, 0, OP_SET),
        (OP_REF, 0, OP_REF, 1, OP_AND),
    ],
)
def test_malformed_programs_are_refused(ops: tuple[int, ...]) -> None:
    needs_extension()
    with pytest.raises(ValueError, match="malformed"):
        builder(prog=program(*ops))


def test_bad_constructor_arguments() -> None:
    needs_extension()
    assert answer_build.AnswerBuilder is not None
    new = answer_build.AnswerBuilder
    with pytest.raises(ValueError, match="int32"):
        new(NAMES, [orjson.dumps(n) for n in NAMES], program(OP_FALSE)[:3])
    with pytest.raises(ValueError, match="length"):
        new(NAMES, [b'"s0"'], b"")
    with pytest.raises(TypeError):
        new(["s0", 1], [b'"s0"', b"1"], b"")  # type: ignore[list-item]  # the check tested
    with pytest.raises(TypeError):
        new(["s0", b"s1"], [b'"s0"', b'"s1"'], b"")  # type: ignore[list-item]  # likewise
    with pytest.raises(TypeError):
        new(["s0"], ['"s0"'], b"")  # type: ignore[list-item]  # encoded must be bytes
    with pytest.raises(TypeError):
        new(5, [], b"")  # type: ignore[arg-type]  # names must be a sequence


def test_build_maps_slots_to_sorted_ranks_and_skips_inactive() -> None:
    needs_extension()
    b = builder()
    table = rank_table([3, INACTIVE, 0, 2, INACTIVE + 7])
    assert b.build(run([0, 1, 2, 3, 4]), START, table) == (("s0", "s2", "s3"), b'["s0","s2","s3"]')
    assert b.build(run([1, 4]), START, table) == ((), b"[]")
    assert b.build(run([]), START, table) == ((), b"[]")
    assert b.build(run([]), START, b"") == ((), b"[]")
    # Two slots of one rank (not made by the replica, but harmless): named once.
    assert b.build(run([0, 1]), START, rank_table([1, 1])) == (("s1",), b'["s1"]')


def test_build_stops_at_the_next_cookie() -> None:
    needs_extension()

    def values() -> Iterator[int]:
        yield START + 1
        yield START + MAX_SLOTS - 1
        yield START + MAX_SLOTS  # the next cookie's first membership: not read past it
        raise AssertionError("read past the run")

    table = rank_table([0, 1] + [INACTIVE] * (MAX_SLOTS - 3) + [3])
    assert builder().build(values(), START, table) == (("s1", "s3"), b'["s1","s3"]')


def test_build_refuses_bad_runs_and_recovers() -> None:
    needs_extension()
    # s3 = s0 and not s1: a stale "held" mark left by a failed build would change answers.
    b = builder(prog=program(OP_REF, 0, OP_REF, 1, OP_NOT, OP_AND, 2, OP_SET, 3))
    table = rank_table([0, 1, 2])
    with pytest.raises(IndexError, match="slot"):
        b.build(run([0, 1, 3]), START, table)  # slot 3: past the rank table
    with pytest.raises(IndexError, match="past the plan"):
        b.build(run([1, 0]), START, rank_table([0, 7]))  # rank 7: past the names
    with pytest.raises(ValueError, match="below"):
        b.build(run([1, -1]), START, table)
    with pytest.raises((OverflowError, TypeError)):
        b.build(iter([START, -1]), START, table)
    with pytest.raises(TypeError):
        b.build(iter([START, "x"]), START, table)  # type: ignore[arg-type]  # what is tested

    class Broken(Exception):
        """What the iterator raises."""

    def failing() -> Iterator[int]:
        yield START + 1
        raise Broken("stream read failed")

    with pytest.raises(Broken, match="stream read failed"):
        b.build(failing(), START, table)
    with pytest.raises(TypeError):
        b.build(5, START, table)  # type: ignore[arg-type]  # not iterable
    # Nothing stale after the failures.
    assert b.build(run([0]), START, table) == (("s0", "s3"), b'["s0","s3"]')
    assert b.build(run([0, 1]), START, table) == (("s0", "s1"), b'["s0","s1"]')
    assert b.build(run([2]), START, table) == (("s2",), b'["s2"]')


def test_build_is_not_reentrant() -> None:
    needs_extension()
    b = builder()
    table = rank_table([0, 1])

    def sneaky() -> Iterator[int]:
        yield START
        b.build(run([1]), START, table)
        yield START + 1

    with pytest.raises(RuntimeError, match="re-entered"):
        b.build(sneaky(), START, table)
    assert b.build(run([1]), START, table) == (("s1",), b'["s1"]')


def test_composite_programs_follow_the_rules() -> None:
    needs_extension()
    text = """segments:
  - id: d
    of: {or: [c, {and: [a, {not: b}]}]}
  - id: a
    rule: {within: 1d, where: {field: type, equals: click}}
  - id: b
    rule: {within: 1d, where: {field: type, equals: search}}
  - id: p
    status: paused
    rule: {within: 1d, where: {field: type, equals: page_view}}
  - id: c
    of: {and: [a, b, {not: p}]}
  - id: e
    of: {and: [d, {not: c}, {or: [p, a]}]}
"""
    plan = AnswerPlan(CompiledRules(parse_rules(text)))
    b = plan.builder
    assert b is not None
    table = rank_table([plan.rank(name) for name in ("a", "b", "p")])
    cases = {
        (0,): ["d", "a", "e"],
        (1,): ["b"],
        (0, 1): ["d", "a", "b", "c"],
        (2,): [],
        (0, 2): ["d", "a", "e"],
        (1, 2): ["b"],
    }
    for slots, want in cases.items():
        assert b.build(run(slots), START, table) == (tuple(want), orjson.dumps(want)), slots
        assert plan.answer(sorted(plan.rank(("a", "b", "p")[s]) for s in slots if s != 2)) == want


def test_composite_program_of_an_inactive_reference() -> None:
    needs_extension()
    text = (
        A_AND_PAUSED_P
        + """  - id: x
    of: {and: [a, p]}
"""
    )
    ruleset = parse_rules(text)
    active = {"a": 0, "x": 2}
    prog = composite_program(list(ruleset.segments), active)
    assert array("i", prog).tolist() == [OP_REF, 0, OP_FALSE, OP_AND, 2, OP_SET, 2]
    # An active composite of an OR of inactive parts never holds.
    or_prog = program(OP_FALSE, OP_FALSE, OP_OR, 2, OP_SET, 1, OP_REF, 0, OP_NOT, OP_SET, 2)
    b = builder(["a", "x", "y"], or_prog)
    assert b.build(run([0]), START, rank_table([0])) == (("a",), b'["a"]')


ESCAPED = [
    'quote"d',
    "back\\slash",
    "caf\u00e9",
    "\u65e5\u672c",
    "emoji \U0001f680",
    "tab\tnew\nline",
    "nul\x00ctl\x1f",
    "sep\u2028\u2029",
    "</script>",
    "",
]


def test_names_that_need_escaping_match_orjson() -> None:
    needs_extension()
    b = builder(ESCAPED)
    table = rank_table(list(range(len(ESCAPED))))
    names, body = b.build(run(range(len(ESCAPED))), START, table)
    assert names == tuple(ESCAPED)
    assert body == orjson.dumps(ESCAPED)
    assert orjson.loads(body) == ESCAPED


@PROPERTY
@given(
    st.lists(st.text(st.characters(exclude_categories=["Cs"]), max_size=8), min_size=1),
    st.data(),
)
def test_any_names_give_orjson_bytes(names: list[str], data: st.DataObject) -> None:
    needs_extension()
    held = data.draw(st.lists(st.integers(0, len(names) - 1), unique=True), "held")
    table = rank_table(list(range(len(names))))
    got_names, body = builder(names).build(run(held), START, table)
    want = [names[i] for i in sorted(held)]
    assert list(got_names) == want
    assert body == orjson.dumps(want)


def test_out_of_range_integers_are_refused_not_wrapped() -> None:
    needs_extension()
    empty = np.empty(0, dtype=np.uint64)
    buckets = np.empty(0, dtype=np.uint32)
    with pytest.raises(OverflowError):
        answer_build.find_position(empty, empty, buckets, 64, -1)
    with pytest.raises(OverflowError):
        answer_build.find_position(empty, empty, buckets, 64, 1 << 64)
    with pytest.raises(ValueError, match="shift"):  # shift 1: 2**63 + 1 buckets
        answer_build.find_position(empty, empty, np.zeros(3, dtype=np.uint32), 1, 0)
    with pytest.raises(OverflowError):
        builder(["a"]).build(iter([]), -1, rank_table([0]))


def test_the_extension_is_built_where_the_tests_run() -> None:
    # deploy/install.sh builds it; a silent fallback would make the lookup slow, not wrong.
    assert answer_build.available()


# -- build_at: CRoaring read directly (docs/decisions/0013) --------------------------------


def needs_direct_read() -> None:
    needs_extension()
    if not answer_build.reads_bitmaps():
        pytest.skip("pyroaring exports no CRoaring iterator here")


@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, MAX_SLOTS - 1)), max_size=600),
    st.integers(0, 6),
)
@PROPERTY
def test_build_at_reads_what_the_iterator_reads(members: list[tuple[int, int]], local: int) -> None:
    """Six cookies sharing up to 600 memberships: runs of over 64 values (several reads),
    and neighbours on both sides whose values must not leak into the answer."""
    needs_direct_read()
    from pyroaring import BitMap64

    names = [f"n{i}" for i in range(MAX_SLOTS)]
    # Every slot active, in reverse order, and every eighth inactive.
    table = rank_table([INACTIVE if s % 8 == 7 else MAX_SLOTS - 1 - s for s in range(MAX_SLOTS)])
    index = BitMap64(loc << 12 | slot for loc, slot in members)
    b = builder(names, program(OP_REF, 0, OP_REF, 1, OP_OR, 2, OP_SET, 2))
    start = local << 12
    want = b.build(index.iter_equal_or_larger(start), start, table)
    assert b.build_at(index.raw_pointer, start, table) == want


def test_build_at_on_a_full_run_and_on_empty_bitmaps() -> None:
    needs_direct_read()
    from pyroaring import BitMap64

    names = [f"n{i}" for i in range(MAX_SLOTS)]
    table = rank_table(list(range(MAX_SLOTS)))
    b = builder(names)
    full = BitMap64(range(START, START + MAX_SLOTS + 3))  # and the next cookie's first three
    got_names, body = b.build_at(full.raw_pointer, START, table)
    assert list(got_names) == names
    assert body == orjson.dumps(names)
    assert b.build_at(BitMap64().raw_pointer, START, table) == ((), b"[]")
    assert b.build_at(BitMap64([1, 2]).raw_pointer, START, table) == ((), b"[]")  # all before


def test_build_at_refuses_bad_arguments_and_recovers() -> None:
    needs_direct_read()
    from pyroaring import BitMap64

    b = builder(prog=program(OP_REF, 0, OP_REF, 1, OP_NOT, OP_AND, 2, OP_SET, 3))
    table = rank_table([0, 1, 2])
    index = BitMap64([START, START + 3])
    with pytest.raises(IndexError, match="slot"):
        b.build_at(index.raw_pointer, START, table)  # slot 3: past the rank table
    with pytest.raises(ValueError, match="null"):
        b.build_at(0, START, table)
    with pytest.raises(OverflowError):
        b.build_at(index.raw_pointer, -1, table)
    # Nothing stale after the failures: s3 = s0 and not s1.
    assert b.build_at(BitMap64([START]).raw_pointer, START, table) == (
        ("s0", "s3"),
        b'["s0","s3"]',
    )


def test_pyroaring_is_read_directly_where_the_tests_run() -> None:
    # pyroaring 1.2 here exports CRoaring's iterator; losing it would slow misses, silently.
    assert answer_build.reads_bitmaps()
    # Binding again is harmless with the same module, refused with any other.
    import pyroaring

    assert answer_build.bind_roaring is not None
    assert answer_build.bind_roaring(str(pyroaring.__file__))
    assert not answer_build.bind_roaring("/nonexistent/pyroaring.so")
