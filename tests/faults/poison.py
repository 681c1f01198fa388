"""Hypothesis strategies for hostile Kafka messages: each is known good or known bad.

Bad ones carry exactly one defect of a kind named in `kind` (malformed JSON, invalid UTF-8,
wrong types, huge fields, deep nesting, absurd timestamps, key trouble); good ones are valid
but as awkward as the format allows (unicode everywhere, deep but legal nesting, odd URLs,
extreme numbers in attrs, unknown fields).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import strategies as st

from dmp.events import EVENT_TYPES, MAX_CATEGORIES

TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
# Fixed once, so that a strategy draws the same thing each time hypothesis replays it.
BASE_TIME = time.time()
KNOWN_FIELDS = frozenset({"uid", "ts", "type", "url", "categories", "geo", "attrs"})
SOCAL = {"country": "USA", "region": "CA", "metro": "803"}
URLS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "http://[::1",  # unbalanced IPv6 bracket: urlsplit raises on it
            "https://www.shop.example:99999/electric/x",  # port out of range
            "//no-scheme.example/path",
            "https://user:pw@WWW.SHOP.EXAMPLE/electric/",
            "javascript:alert(1)",
            "https://xn--80ak6aa92e.example/",
            "",
        ]
    ),
    st.builds(lambda t: f"https://{t}.shop.example/electric/{t}", TEXT),
)
INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)
JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


@dataclass(frozen=True)
class Message:
    kind: str  # "good" or the defect of a bad one
    key: bytes | None
    value: bytes | None

    @property
    def good(self) -> bool:
        return self.kind == "good"


def nested(depth: int, leaf: object) -> object:
    value = leaf
    for _ in range(depth):
        value = {"n": value}
    return value


@st.composite
def good_event(draw: st.DrawFn, uid: str) -> dict[str, Any]:
    now = BASE_TIME
    event: dict[str, Any] = {
        "uid": uid,
        "ts": draw(st.floats(min_value=now - 6 * 86400, max_value=now + 60)),  # inside 7d
        "type": draw(st.sampled_from(sorted(EVENT_TYPES))),
        # One category under sports/ so every good event matches a trait and leaves state.
        "categories": ["sports/x" + draw(TEXT), *draw(st.lists(TEXT, max_size=5))],
        "url": draw(URLS),
    }
    if draw(st.booleans()):
        event["geo"] = draw(
            st.one_of(
                st.just(SOCAL),
                st.fixed_dictionaries({}, optional={"country": TEXT, "metro": TEXT, "zip": TEXT}),
            )
        )
    if draw(st.booleans()):
        event["attrs"] = {
            "order_value": draw(JSON),
            "query": draw(st.one_of(TEXT, st.just("EV and PHEV"), JSON)),
            "deep": nested(draw(st.integers(0, 200)), draw(JSON)),
            **draw(st.dictionaries(TEXT, JSON, max_size=3)),
        }
    if draw(st.booleans()):
        event[draw(TEXT.filter(lambda t: t not in KNOWN_FIELDS))] = draw(JSON)  # unknown field
    return event


def _encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


@st.composite
def bad_message(draw: st.DrawFn, uid: str) -> Message:
    event = draw(good_event(uid))
    key: bytes | None = uid.encode()
    kind = draw(
        st.sampled_from(
            [
                "malformed_json",
                "invalid_utf8",
                "not_an_object",
                "wrong_type",
                "huge_field",
                "too_many_categories",
                "too_deep",
                "absurd_ts",
                "missing_field",
                "unknown_type",
                "key_mismatch",
                "no_key",
                "empty",
            ]
        )
    )
    value: bytes | None = None
    if kind == "malformed_json":
        raw = _encode(event)
        cut = draw(st.integers(1, len(raw) - 1))
        value = raw[:cut] + draw(st.sampled_from([b"", b"}", b",,", b"'", b"\x00", b"NaN"]))
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            pass
        else:
            value += b"]"  # the cut happened to leave valid JSON: spoil it
    elif kind == "invalid_utf8":
        raw = _encode(event)
        at = raw.index(b'"uid"') + 1
        value = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])) + raw[at:]
    elif kind == "not_an_object":
        value = orjson.dumps(draw(st.one_of(JSON_LEAF, st.lists(JSON, max_size=3))))
    elif kind == "wrong_type":
        field = draw(st.sampled_from(["uid", "ts", "type", "url", "categories", "geo", "attrs"]))
        wrong = {
            "uid": st.one_of(INT, st.just(""), st.just("x" * 129), st.lists(TEXT)),
            "ts": st.one_of(TEXT, st.booleans(), st.lists(INT), st.none()),
            "type": st.one_of(INT, st.lists(TEXT), st.none()),
            "url": st.one_of(INT, st.lists(TEXT), st.dictionaries(TEXT, TEXT)),
            "categories": st.one_of(TEXT, st.lists(INT, min_size=1), INT),
            "geo": st.one_of(TEXT, st.lists(TEXT), st.just({"metro": 803})),
            "attrs": st.one_of(TEXT, st.lists(JSON), INT),
        }[field]
        event[field] = draw(wrong.filter(lambda v: v is not None or field != "url"))
        if field == "uid":
            key = str(event["uid"]).encode()
        value = _encode(event)
    elif kind == "huge_field":
        event["url"] = "https://x.example/" + "a" * draw(st.integers(70_000, 300_000))
        value = _encode(event)
    elif kind == "too_many_categories":
        event["categories"] = ["sports/x"] * draw(st.integers(MAX_CATEGORIES + 1, 500))
        value = _encode(event)
    elif kind == "too_deep":
        # orjson refuses nesting past 1024 levels: malformed for us, never a crash.
        value = _encode({**event, "attrs": {}}).replace(
            b'"attrs":{}', b'"attrs":' + b'{"n":' * 1100 + b"1" + b"}" * 1100
        )
    elif kind == "absurd_ts":
        event["ts"] = draw(
            st.sampled_from([-1, 0, 1e15, 1.7e12, 4.2e9, 1e308, -1e308, 2**63, BASE_TIME + 86400])
        )
        value = _encode(event)
    elif kind == "missing_field":
        del event[draw(st.sampled_from(["uid", "ts", "type"]))]
        value = _encode(event)
    elif kind == "unknown_type":
        event["type"] = draw(TEXT.filter(lambda t: t not in EVENT_TYPES))
        value = _encode(event)
    elif kind == "key_mismatch":
        key = draw(st.binary(min_size=1, max_size=20).filter(lambda k: k != uid.encode()))
        value = _encode(event)
    elif kind == "no_key":
        key = None
        value = _encode(event)
    return Message(kind, key, value)  # "empty": no value at all


@st.composite
def message(draw: st.DrawFn, n: int) -> Message:
    """The n-th message of a stream: bad about half of the time."""
    uid = f"p-{n}"
    if draw(st.booleans()):
        return draw(bad_message(uid))
    return Message("good", uid.encode(), _encode(draw(good_event(uid))))
