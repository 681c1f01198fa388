"""The event fields rules may test (event format v1, docs/events.md)."""

from __future__ import annotations

# path -> the type an event carries there; "list" fields are lists of text.
KNOWN_FIELDS: dict[tuple[str, ...], str] = {
    ("uid",): "str",
    ("type",): "str",
    ("url",): "str",
    ("categories",): "list",
    ("geo", "country"): "str",
    ("geo", "region"): "str",
    ("geo", "metro"): "str",
    ("geo", "city"): "str",
    ("geo", "zip"): "str",
}

# Anything below these is free-form and typed by the event itself.
FREE_PREFIXES: tuple[str, ...] = ("attrs",)

# Event types of event format v1: a rule on another type could never match.
EVENT_TYPES: tuple[str, ...] = (
    "page_view",
    "click",
    "conversion",
    "impression",
    "search",
    "video_view",
)


def field_kind(path: tuple[str, ...]) -> str | None:
    """'str', 'list', 'any' for a free-form field, or None for an unknown one."""
    if path in KNOWN_FIELDS:
        return KNOWN_FIELDS[path]
    if len(path) >= 2 and path[0] in FREE_PREFIXES and all(path):
        return "any"
    return None


def known_field_names() -> str:
    names = [".".join(p) for p in KNOWN_FIELDS] + [f"{p}.<name>" for p in FREE_PREFIXES]
    return ", ".join(names)
