"""Event format v1 (docs/events.md): decode and validate one Kafka message."""

from __future__ import annotations

from typing import Any

import orjson

try:
    from dmp._events import usable as usable  # re-exported: the tests compare it
except ImportError:  # not built (pip install -e . builds it): the Python checks decide alone
    usable = None  # type: ignore[assignment]  # a function when built, else None

MAX_UID_LENGTH = 128
MAX_CATEGORIES = 64
EVENT_TYPES = frozenset({"page_view", "click", "conversion", "impression", "search", "video_view"})
_GEO_FIELDS = tuple(
    (name, f"geo.{name} must be a string") for name in ("country", "region", "metro", "city", "zip")
)
_NUMBERS = (int, float)
# Timestamps before 2000 or in milliseconds by mistake are refused, not misread.
_MIN_TS = 946_684_800.0
_MAX_TS = 4_102_444_800.0


class BadEvent(Exception):
    """The event cannot be used; ``reason`` is short and goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_event(
    value: bytes | None, key: bytes | None, *, max_bytes: int, now: float, max_future: float
) -> dict[str, Any]:
    """The validated event as a dict; raises BadEvent with the reason.

    The C extension (dmp/_events.c) answers a valid event; anything else goes through the
    Python checks (``checked``), which name what is wrong. Both accept exactly the same
    events: a property test holds them equal.
    """
    if value is None:
        raise BadEvent("empty message")
    if len(value) > max_bytes:
        raise BadEvent(f"event is {len(value)} bytes, over the limit of {max_bytes}")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadEvent(f"invalid JSON: {exc}") from None
    if usable is not None and usable(event, key, now + max_future, EVENT_TYPES):
        return event  # type: ignore[no-any-return]  # a dict: usable() checked
    return checked(event, key, now=now, max_future=max_future)


def checked(event: Any, key: bytes | None, *, now: float, max_future: float) -> dict[str, Any]:
    """decode_event's checks in Python, on the decoded JSON.

    Each field is tested once on the way a valid event passes; the _check helpers run only
    to say what is wrong (the helper calls, an f-string per geo field and a type union per
    ts were most of its cost, docs/decisions/0014).
    """
    if not isinstance(event, dict):
        raise BadEvent("event must be a JSON object")
    uid = event.get("uid")
    if (
        not isinstance(uid, str)
        or not uid
        or len(uid) > MAX_UID_LENGTH
        or key is None
        or key != uid.encode("utf-8")
    ):
        _check_uid(uid, key)
    ts = event.get("ts")
    if (
        isinstance(ts, _NUMBERS)
        and not isinstance(ts, bool)
        and _MIN_TS <= ts <= _MAX_TS
        and ts <= now + max_future
    ):
        event["ts"] = float(ts)
    else:
        event["ts"] = _check_ts(ts, now, max_future)
    kind = event.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        _check_str("type", kind, required=True)
        raise BadEvent(f"unknown type {kind!r}; one of {sorted(EVENT_TYPES)}")
    url = event.get("url")
    if url is not None and not isinstance(url, str):
        raise BadEvent("url must be a string")
    categories = event.get("categories")
    if categories is not None:
        if not isinstance(categories, list):
            raise BadEvent("categories must be a list of strings")
        for category in categories:
            if not isinstance(category, str):
                raise BadEvent("categories must be a list of strings")
        if len(categories) > MAX_CATEGORIES:
            raise BadEvent(f"categories has {len(categories)} items, over {MAX_CATEGORIES}")
    geo = event.get("geo")
    if geo is not None:
        if not isinstance(geo, dict):
            raise BadEvent("geo must be an object")
        for name, problem in _GEO_FIELDS:
            part = geo.get(name)
            if part is not None and not isinstance(part, str):
                raise BadEvent(problem)
    attrs = event.get("attrs")
    if attrs is not None and not isinstance(attrs, dict):
        raise BadEvent("attrs must be an object")
    return event


def _check_uid(uid: object, key: bytes | None) -> None:
    if not isinstance(uid, str) or not uid:
        raise BadEvent("missing or non-string uid")
    if len(uid) > MAX_UID_LENGTH:
        raise BadEvent(f"uid longer than {MAX_UID_LENGTH} characters")
    # Partition ownership follows the key: without it one cookie could land in two partitions
    # and be counted apart in each.
    if key is None:
        raise BadEvent("missing Kafka key; produce with key = uid")
    if key != uid.encode("utf-8"):
        raise BadEvent("Kafka key does not equal uid")


def _check_ts(ts: object, now: float, max_future: float) -> float:
    if isinstance(ts, bool) or not isinstance(ts, _NUMBERS):
        raise BadEvent("ts must be a number (seconds since the epoch)")
    value = float(ts)
    if not _MIN_TS <= value <= _MAX_TS:
        raise BadEvent(f"ts {ts} is not a plausible time in seconds since the epoch")
    if value > now + max_future:
        raise BadEvent(f"ts {ts} is more than {max_future:g}s in the future")
    return value


def _check_str(name: str, value: object, *, required: bool) -> None:
    if value is None:
        if required:
            raise BadEvent(f"missing {name}")
        return
    if not isinstance(value, str):
        raise BadEvent(f"{name} must be a string")
