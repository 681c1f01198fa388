"""Logging set-up for the command line (services log with module loggers only).

``json`` writes one JSON object per line (what log shippers want); ``text`` is for people at a
terminal. Both carry the fields bound with ``log_context``/``bind``: the ingest batch id and
the lookup request id (``REQUEST_ID``), so one line leads to the batch or request it came
from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType

import orjson

LOG_FORMATS = ("json", "text")
REQUEST_ID_HEADER = "X-Request-ID"
MAX_REQUEST_ID = 64

# Per task (asyncio copies the context into each task), so concurrent requests never mix ids.
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
_fields: ContextVar[Mapping[str, str]] = ContextVar("dmp_log_fields", default=_NO_FIELDS)
# The lookup's request id has a variable of its own: set on every bid-time request, where
# merging a mapping in `bind` cost ~1.5 us of CPU of ~50 (docs/decisions/0009).
REQUEST_ID: ContextVar[str | None] = ContextVar("dmp_request_id", default=None)


def bind(**fields: str) -> Token[Mapping[str, str]]:
    """Add fields to every log line of the current task until ``unbind(token)``."""
    return _fields.set({**_fields.get(), **fields})


def unbind(token: Token[Mapping[str, str]]) -> None:
    _fields.reset(token)


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def current_fields() -> Mapping[str, str]:
    """The fields bound for the current task, the request id included."""
    fields = _fields.get()
    rid = REQUEST_ID.get()
    return fields if rid is None else {**fields, "request_id": rid}


def request_id(header: str | None) -> str:
    """The caller's request id when it is sane, else a new random one."""
    if header and len(header) <= MAX_REQUEST_ID and header.isprintable():
        return header
    return os.urandom(8).hex()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(current_fields())
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = current_fields()
        if not fields:
            return line
        first, sep, rest = line.partition("\n")
        context = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{first} [{context}]{sep}{rest}"


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")


def configure_logging(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiokafka is chatty at INFO about every rebalance step.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
