"""Cookie states as format 1 bytes: exact round trips, C equal to Python, JSON still read."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmp import _states, state_codec
from dmp.cookie_state import CookieState

FLOATS = st.floats(allow_nan=False)  # JSON, the old format, carries no NaN either
INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
NUMBERS = st.one_of(FLOATS, INT64)
ENTRIES = st.one_of(
    st.lists(FLOATS, max_size=8),  # times
    st.lists(st.lists(FLOATS, min_size=2, max_size=2), max_size=5),  # [time, value] floats
    st.lists(st.one_of(NUMBERS, st.lists(NUMBERS, max_size=3)), max_size=5),  # anything else
)
# Trait ids are lowercase hex (stored as bytes); anything else is stored as UTF-8.
TEXTS = st.one_of(st.text(max_size=12), st.from_regex(r"[0-9a-fA-F]{0,14}", fullmatch=True))
HISTORIES = st.dictionaries(TEXTS, ENTRIES, max_size=6)
MEMBERS = st.lists(TEXTS, max_size=6, unique=True).map(sorted)
LOCALS = st.integers(min_value=0, max_value=(1 << 63) - 1)


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (1 == 1.0 is not enough here), and -0.0
    told from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


@given(LOCALS, HISTORIES, MEMBERS)
def test_c_and_python_write_the_same_bytes_and_read_back_the_state(
    local: int, history: dict[str, list[Any]], members: list[str]
) -> None:
    raw = state_codec.encode_py(local, history, members)
    assert _states.encode(local, history, members) == raw
    for decode in (state_codec.decode_py, _states.decode):
        back = decode(raw)
        assert same(back, (local, history, members))
        assert state_codec.encode_py(*back) == raw  # a decoded state writes the same bytes


def test_times_are_stored_as_raw_doubles() -> None:
    history: dict[str, list[Any]] = {
        "t1": [1_796_486_919.713, 1_796_486_920.25],
        "t2": [[1_796_486_919.5, 2.25]],
    }
    raw = state_codec.encode(3, history, ["seg_a"])
    json = orjson.dumps({"l": 3, "h": history, "m": ["seg_a"]})
    assert len(raw) == 1 + 1 + 1 + 6 + 1 + (3 + 2 + 16) + (3 + 2 + 16)
    assert len(raw) < len(json)


def test_hex_trait_ids_take_half_their_length() -> None:
    hexed = state_codec.encode(0, {"e304af621df3": []}, [])
    assert len(hexed) == 1 + 1 + 1 + 1 + (1 + 6) + 2  # tag, local, 0 members, 1 trait
    # Not lowercase hex, or odd: stored as written, and read back as written.
    for trait in ("E304AF621DF3", "e304af621df", "e304af621dfg"):
        raw = state_codec.encode(0, {trait: []}, [])
        assert len(raw) == 1 + 1 + 1 + 1 + (1 + len(trait)) + 2
        assert state_codec.decode(raw)[1] == {trait: []}


@pytest.mark.parametrize(
    "history",
    [
        {"t": [True]},  # a bool is not a number here (JSON keeps it a bool)
        {"t": [1 << 63]},  # past a signed 64-bit int (JSON takes it)
        {"t": [[[1.0]]]},  # lists in lists in lists
        {"t": ["text"]},
        {"t": (1.0, 2.0)},  # not a list
    ],
)
def test_what_format_1_cannot_carry_is_stored_as_json(history: dict[str, Any]) -> None:
    with pytest.raises(state_codec.Unencodable):
        state_codec.encode_py(5, history, [])
    assert _states.encode(5, history, []) is None
    state = CookieState(5, history, frozenset({"s"}))
    raw = state.encode()
    assert raw == orjson.dumps({"l": 5, "h": history, "m": ["s"]})
    back = CookieState.decode(raw)
    assert back.local == 5
    assert back.members == {"s"}


def test_non_str_keys_and_bad_locals_are_not_format_1() -> None:
    for local, history, members in (
        (-1, {}, []),
        (1 << 63, {}, []),
        (1, {1: [1.0]}, []),
        (1, {}, ("a",)),
        (1, {"\ud800": [1.0]}, []),  # a lone surrogate is not UTF-8
    ):
        with pytest.raises(state_codec.Unencodable):
            state_codec.encode_py(local, history, members)  # type: ignore[arg-type]
        assert _states.encode(local, history, members) is None  # type: ignore[arg-type]


def test_states_written_as_json_before_format_1_are_still_read() -> None:
    raw = b'{"l":42,"h":{"e304af621df3":[1796486919.713],"x":[[1.0,2]]},"m":["b","a"]}'
    state = CookieState.decode(raw)
    assert state.local == 42
    assert state.history == {"e304af621df3": [1796486919.713], "x": [[1.0, 2]]}
    assert state.members == {"a", "b"}
    # Written again, it is format 1, and reads back the same.
    again = state.encode()
    assert again[0] == state_codec.FORMAT_1
    assert CookieState.decode(again) == state


@given(LOCALS, HISTORIES, MEMBERS, st.data())
def test_every_cut_or_extended_state_is_refused(
    local: int, history: dict[str, list[Any]], members: list[str], data: st.DataObject
) -> None:
    raw = state_codec.encode_py(local, history, members)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    for decode in (state_codec.decode_py, _states.decode):
        with pytest.raises(ValueError, match="malformed state"):
            decode(raw[:cut])
        with pytest.raises(ValueError, match="malformed state"):
            decode(raw + b"\x00")


@given(st.binary(max_size=64))
def test_any_bytes_are_read_or_refused_alike(raw: bytes) -> None:
    """Garbage never crashes either reader, and both agree on what they read."""
    results: list[tuple[str, Any]] = []
    for decode in (state_codec.decode_py, _states.decode):
        try:
            results.append(("ok", decode(b"\x01" + raw)))
        except ValueError:
            results.append(("refused", None))
    assert results[0][0] == results[1][0]
    if results[0][0] == "ok":
        assert same(results[0][1], results[1][1])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01\x00" + b"\x80" * 9 + b"\x02" + b"\x00",  # a member count of 2**64
        b"\x01" + b"\x80" * 9 + b"\x02" + b"\x00\x00",  # a local of 2**64
        b"\x01\x00\x01\x82" + b"\x80" * 8 + b"\x02" + b"a\x00",  # a text of 2**64 + 1 bytes
        b"\x01" + b"\x80" * 10 + b"\x00\x00\x00",  # eleven bytes
    ],
)
def test_a_varint_past_64_bits_is_refused_not_wrapped(raw: bytes) -> None:
    for decode in (state_codec.decode_py, _states.decode):
        with pytest.raises(ValueError, match="malformed state"):
            decode(raw)


def test_the_largest_local_reads_back() -> None:
    raw = state_codec.encode_py((1 << 63) - 1, {}, [])
    assert raw == bytes([1]) + b"\xff" * 8 + b"\x7f" + b"\x00\x00"
    for decode in (state_codec.decode_py, _states.decode):
        assert decode(raw) == ((1 << 63) - 1, {}, [])
        assert decode(memoryview(raw)) == ((1 << 63) - 1, {}, [])


def test_a_huge_count_is_refused_without_allocating() -> None:
    # local 0, then a member count of 2**62: the bytes cannot hold that many.
    raw = bytes([1, 0]) + bytes([0x80] * 8 + [0x40])
    for decode in (state_codec.decode_py, _states.decode):
        with pytest.raises(ValueError, match="malformed state"):
            decode(raw)
