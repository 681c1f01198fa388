from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dmp.dead_letter import reason_class
from dmp.events import EVENT_TYPES, BadEvent, checked, decode_event, usable

NOW = 1_800_000_000.0


def decode(doc: Any, key: bytes | None = b"u1", raw: bytes | None = None) -> dict[str, Any]:
    value = raw if raw is not None else orjson.dumps(doc)
    return decode_event(value, key, max_bytes=64 * 1024, now=NOW, max_future=3600)


def good(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"uid": "u1", "ts": NOW - 10, "type": "page_view", "url": "https://x"}
    doc.update(over)
    return doc


def test_valid_event_is_returned() -> None:
    event = decode(good(geo={"country": "USA", "metro": "803"}, categories=["a"], attrs={"k": 1}))
    assert event["uid"] == "u1"
    assert event["ts"] == NOW - 10


@pytest.mark.parametrize(
    ("doc", "raw", "key", "reason", "label"),
    [
        (None, b"{not json", b"u1", "invalid JSON", "invalid_json"),
        (None, b"[1,2]", b"u1", "event must be a JSON object", "schema"),
        ({"ts": NOW, "type": "click"}, None, b"u1", "missing or non-string uid", "schema"),
        (good(uid=5), None, b"u1", "missing or non-string uid", "schema"),
        (good(ts="yesterday"), None, b"u1", "ts must be a number", "bad_timestamp"),
        (
            good(ts=NOW * 1000),
            None,
            b"u1",
            "ts 1800000000000.0 is not a plausible",
            "bad_timestamp",
        ),
        (
            good(ts=NOW + 7200),
            None,
            b"u1",
            "ts 1800007200.0 is more than 3600s in the future",
            "bad_timestamp",
        ),
        (good(type="teleport"), None, b"u1", "unknown type 'teleport'", "schema"),
        (good(categories="auto"), None, b"u1", "categories must be a list of strings", "schema"),
        (good(geo={"metro": 803}), None, b"u1", "geo.metro must be a string", "schema"),
        (good(), None, None, "missing Kafka key", "bad_key"),
        (good(), None, b"someone-else", "Kafka key does not equal uid", "bad_key"),
    ],
)
def test_bad_events_have_reasons(
    doc: Any, raw: bytes | None, key: bytes | None, reason: str, label: str
) -> None:
    with pytest.raises(BadEvent) as info:
        decode(doc, key=key, raw=raw)
    assert info.value.reason.startswith(reason)
    assert reason_class(info.value.reason) == label


def test_oversized_event() -> None:
    with pytest.raises(BadEvent) as info:
        decode(None, raw=b" " * (64 * 1024 + 1))
    assert info.value.reason == "event is 65537 bytes, over the limit of 65536"
    assert reason_class(info.value.reason) == "too_large"


# -- the C fast path (dmp/_events.c) accepts exactly what the Python checks accept -------------
_TEXT = st.text(max_size=4) | st.just("x" * 129) | st.just("é" * 128)
_VALUE = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | _TEXT
_TS = (
    st.floats(900_000_000, 4_200_000_000, allow_nan=False)
    | st.integers(900_000_000, 4_200_000_000)
    | st.sampled_from([946_684_800, 946_684_799.99, 4_102_444_800, NOW + 3600, NOW + 3600.001])
    | st.integers(-(2**63), 2**64 - 1)
    | _VALUE
)


_EDGES: dict[str, st.SearchStrategy[Any]] = {
    "uid": st.sampled_from(["é", "", "x" * 128, "x" * 129, "u2"]) | _VALUE,
    "ts": _TS,
    "type": st.sampled_from(["click", "nope", "Page_view"]) | _VALUE,
    "url": _VALUE,
    "categories": st.lists(_TEXT, max_size=3)
    | st.lists(_VALUE, max_size=3)
    | st.sampled_from([["c"] * 64, ["c"] * 65, ["c"] * 64 + [1]])
    | _VALUE,
    "geo": st.dictionaries(
        st.sampled_from(["country", "region", "metro", "city", "zip", "other"]),
        _VALUE | st.lists(_TEXT, max_size=1),
    )
    | _VALUE,
    "attrs": st.dictionaries(_TEXT, _VALUE, max_size=2) | _VALUE,
}


@st.composite
def near_valid_events(draw: st.DrawFn) -> tuple[Any, bytes | None]:
    """A valid event with one to three fields changed, absent or null (or not an object)."""
    if draw(st.integers(0, 30)) == 0:
        return draw(st.lists(_VALUE, max_size=2)), b"u1"
    doc: dict[str, Any] = {
        "uid": "u1",
        "ts": NOW - 10,
        "type": "page_view",
        "url": "https://x/a",
        "categories": ["a", "b"],
        "geo": {"country": "USA", "metro": "803"},
        "attrs": {"cart_value": 5},
    }
    for name in draw(st.lists(st.sampled_from(sorted(_EDGES)), min_size=1, max_size=3)):
        how = draw(st.integers(0, 5))
        if how == 0:
            doc.pop(name, None)
        elif how == 1:
            doc[name] = None
        else:
            doc[name] = draw(_EDGES[name])
    uid = doc.get("uid")
    key = draw(st.sampled_from([b"u1", "é".encode(), None, b"u2"]))
    if isinstance(uid, str) and draw(st.integers(0, 3)):
        key = uid.encode()
    return doc, key


# Times now may be: the ts limit in the future then lies below, at or above the plausible
# maximum, so both bounds decide somewhere.
_NOWS = st.sampled_from([NOW, 4_102_444_800 - 3600, 4_102_444_800 - 3599.5, 4_102_444_800])


@pytest.mark.skipif(usable is None, reason="the C extension is not built")
@settings(max_examples=1500, deadline=None)
@given(case=near_valid_events(), now=_NOWS)
@example(case=(good(categories=["c"] * 64), b"u1"), now=NOW)
@example(case=(good(categories=["c"] * 65), b"u1"), now=NOW)
@example(case=(good(uid="x" * 128), b"x" * 128), now=NOW)
@example(case=(good(uid="x" * 129), b"x" * 129), now=NOW)
@example(case=(good(ts=NOW + 3600), b"u1"), now=NOW)
@example(case=(good(ts=NOW + 3600.001), b"u1"), now=NOW)
@example(case=(good(ts=int(NOW) + 3600), b"u1"), now=NOW)
@example(case=(good(ts=int(NOW) + 3601), b"u1"), now=NOW)
@example(case=(good(ts=946_684_800), b"u1"), now=NOW)
@example(case=(good(ts=946_684_799), b"u1"), now=NOW)
@example(case=(good(ts=946_684_799.9), b"u1"), now=NOW)
@example(case=(good(ts=4_102_444_800), b"u1"), now=4_102_444_800)
@example(case=(good(ts=4_102_444_801), b"u1"), now=4_102_444_800)
@example(case=(good(ts=4_102_444_800.001), b"u1"), now=4_102_444_800)
@example(case=(good(ts=4_102_444_800), b"u1"), now=4_102_444_800 - 3600.5)
def test_the_fast_path_accepts_exactly_what_the_checks_accept(
    case: tuple[Any, bytes | None], now: float
) -> None:
    doc, key = case
    assert usable is not None
    event = orjson.loads(orjson.dumps(doc))  # as decoded from Kafka: ints stay ints
    mine = copy.deepcopy(event)
    try:
        expected: dict[str, Any] | None = checked(event, key, now=now, max_future=3600)
    except BadEvent:
        expected = None
    accepted = usable(mine, key, now + 3600, EVENT_TYPES)
    assert accepted == (expected is not None)
    if expected is not None:
        assert mine == expected
        assert type(mine["ts"]) is float


def test_the_fast_path_is_built_where_the_tests_run() -> None:
    # pip install -e . builds it; without it the property test above would skip, unseen.
    assert usable is not None
