"""Redis key layout. Everything one partition writes shares one hash tag, so a batch's
transaction stays in one Redis Cluster slot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class PartitionKeys:
    prefix: str
    topic: str
    partition: int

    @property
    def tag(self) -> str:
        return f"{self.prefix}:{{{self.topic}:{self.partition}}}"

    @property
    def offset(self) -> str:
        """Next Kafka offset to consume, written in the same transaction as the state."""
        return f"{self.tag}:offset"

    @property
    def next_local(self) -> str:
        return f"{self.tag}:next_local"

    @property
    def ids(self) -> str:
        """8 bytes per local position: the cookie id's 64-bit hash (big-endian)."""
        return f"{self.tag}:ids"

    @property
    def changes(self) -> str:
        return f"{self.tag}:changes"

    @property
    def snapshot(self) -> str:
        """Hash: the replica's user-major index of this partition and the stream id it is at."""
        return f"{self.tag}:snapshot"

    @property
    def snapshot_lock(self) -> str:
        return f"{self.tag}:snapshot-lock"

    @property
    def due(self) -> str:
        """Sorted set: cookie id -> the time its memberships may next change by themselves."""
        return f"{self.tag}:due"

    @property
    def privacy_pending(self) -> str:
        """Set: cookie ids opted out or erased whose stored data ingest must still remove."""
        return f"{self.tag}:privacy-pending"

    @property
    def rules_from(self) -> str:
        """Hash: rule version number -> the first offset this partition applied under it."""
        return f"{self.tag}:rules-from"

    @property
    def backfill_stages(self) -> str:
        """Hash: backfill job -> its manifest (chunks, next chunk to merge, traits it fills)."""
        return f"{self.tag}:backfill"

    def backfill_chunk(self, job: str, chunk: int) -> str:
        """JSON list of history events (older than the live-from offset) for one chunk."""
        return f"{self.tag}:backfill:{job}:{chunk}"

    @property
    def backfilled(self) -> str:
        """Hash: backfill job -> a summary, written when its last chunk merged."""
        return f"{self.tag}:backfilled"

    def cookie(self, uid: str) -> str:
        return f"{self.tag}:c:{uid}"  # split back by TopicCookies

    def bitmap(self, segment_id: str, chunk: int) -> str:
        return f"{self.tag}:bm:{segment_id}:{chunk}"

    @property
    def bitmap_pattern(self) -> str:
        return f"{self.tag}:bm:*"

    def parse_bitmap_key(self, key: str) -> tuple[str, int]:
        segment_id, chunk = key[len(self.tag) + len(":bm:") :].rsplit(":", 1)
        return segment_id, int(chunk)


def partitions_key(prefix: str, topic: str) -> str:
    """Set of partition numbers that have state, so replicas know what to load."""
    return f"{prefix}:partitions:{topic}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class TopicCookies:
    """The cookie state keys (``PartitionKeys.cookie``) of every partition of a topic.

    ``pattern`` is a SCAN ``MATCH`` for them, ``*`` standing for the partition number; a glob
    cannot say "digits only" (nor keep ``*`` from running past the ``}``), so a name is one
    of partition P's when it starts with ``head`` and the text up to the first ``end`` is
    exactly ``str(P)`` (the uid follows ``end``). Split inline by callers walking millions
    of names, hence strings rather than a method.
    """

    prefix: str
    topic: str

    @property
    def pattern(self) -> str:
        return f"{_glob_escape(self.prefix)}:{{{_glob_escape(self.topic)}:*}}:c:*"

    @property
    def head(self) -> str:
        return f"{self.prefix}:{{{self.topic}:"

    end: ClassVar[str] = "}:c:"
