"""Redis key layout. Everything one partition writes shares one hash tag, so a batch's
transaction stays in one Redis Cluster slot."""

from __future__ import annotations

from dataclasses import dataclass


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
        return f"{self.tag}:c:{uid}"

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
