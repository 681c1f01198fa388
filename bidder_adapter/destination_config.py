"""Where a partner's segment membership changes are exported to (server to server)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, cast
from urllib.parse import urlsplit

from bidder_adapter.doc_reader import DocReader, describe, join

SinkKind = Literal["http", "file"]
ExportUserId = Literal["cookie", "partner"]

SINK_KINDS: Final[tuple[SinkKind, ...]] = ("http", "file")
EXPORT_USER_IDS: Final[tuple[ExportUserId, ...]] = ("cookie", "partner")
MAX_BATCH_USERS: Final = 100_000


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    """One export target. `user_id` picks the id each line carries: our cookie id, or the
    partner's own id through the match table (users never synced are then left out)."""

    kind: SinkKind
    url: str = ""
    path: str = ""
    batch_size: int = 500
    interval_seconds: float = 60.0
    user_id: ExportUserId = "cookie"
    timeout_seconds: float = 10.0
    retry_max_seconds: float = 60.0
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))
        problems = list(self._problems())
        if problems:
            raise DestinationConfigError(problems)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.kind not in SINK_KINDS:
            yield "kind", f"must be one of {', '.join(map(repr, SINK_KINDS))}, got {self.kind!r}"
        elif self.kind == "http":
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                yield "url", f"must be an http(s) URL, got {self.url!r}"
            if self.path:
                yield "path", "only for kind 'file'"
        else:
            if not self.path:
                yield "path", "required for kind 'file' (a folder)"
            if self.url:
                yield "url", "only for kind 'http'"
            if self.headers:
                yield "headers", "only for kind 'http'"
        if not 1 <= self.batch_size <= MAX_BATCH_USERS:
            yield "batch_size", f"must be 1 to {MAX_BATCH_USERS}, got {self.batch_size}"
        for name in ("interval_seconds", "timeout_seconds", "retry_max_seconds"):
            if not getattr(self, name) > 0:
                yield name, f"must be > 0, got {getattr(self, name)}"
        if self.user_id not in EXPORT_USER_IDS:
            choices = ", ".join(map(repr, EXPORT_USER_IDS))
            yield "user_id", f"must be one of {choices}, got {self.user_id!r}"


class DestinationConfigError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


_REQUIRED: Final = ("kind",)
_OPTIONAL: Final = (
    "url",
    "path",
    "batch_size",
    "interval_seconds",
    "user_id",
    "timeout_seconds",
    "retry_max_seconds",
    "headers",
)


def _number(
    reader: DocReader, doc: Mapping[str, object], key: str, path: str, default: float
) -> float:
    if key not in doc:
        return default
    value = doc[key]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    reader.fail(join(path, key), f"must be a number, got {describe(value)}")
    return default


def read_destination(reader: DocReader, value: object, path: str) -> DestinationConfig | None:
    """Read a `destination:` block; problems go to `reader.errors` with their paths."""
    doc = reader.mapping(value, path)
    if doc is None:
        return None
    before = len(reader.errors)
    reader.check_keys(doc, path, _REQUIRED, _OPTIONAL)
    kind = reader.string(doc, "kind", path)
    url = reader.string(doc, "url", path)
    folder = reader.string(doc, "path", path)
    batch_size = reader.integer(doc, "batch_size", path) if "batch_size" in doc else 500
    interval = _number(reader, doc, "interval_seconds", path, 60.0)
    timeout = _number(reader, doc, "timeout_seconds", path, 10.0)
    retry_max = _number(reader, doc, "retry_max_seconds", path, 60.0)
    user_id = reader.string(doc, "user_id", path) if "user_id" in doc else "cookie"
    headers = reader.string_map(doc, "headers", path)
    if len(reader.errors) > before:
        return None
    try:
        return DestinationConfig(
            kind=cast(SinkKind, kind),
            url=url,
            path=folder,
            batch_size=batch_size,
            interval_seconds=interval,
            user_id=cast(ExportUserId, user_id),
            timeout_seconds=timeout,
            retry_max_seconds=retry_max,
            headers=headers,
        )
    except DestinationConfigError as exc:
        for key, message in exc.problems:
            reader.fail(join(path, key), message)
        return None
