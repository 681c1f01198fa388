from __future__ import annotations

from typing import Any

import orjson
import pytest

from dmp.dead_letter import reason_class
from dmp.events import BadEvent, decode_event

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
