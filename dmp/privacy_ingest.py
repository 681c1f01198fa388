"""Ingest's side of privacy: consent checks, the suppression list, pending erasures.

The suppression list is mirrored in memory (followed from its change stream, like a lookup
replica's), so a batch asks Redis only about cookies the mirror names (usually none) instead
of about every cookie in it: 2,000 ids cost 3.6 ms a batch in one HMGET, 1.8 us an event.
A cookie suppressed in Redis before the mirror heard of it is caught by its pending mark,
which every batch reads, and is then added to the mirror.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from dmp.config import Settings
from dmp.consent import ConsentPolicy
from dmp.keys import PartitionKeys
from dmp.privacy import ERASED, PrivacyStore
from dmp.privacy_follow import SuppressionFollower, SuppressionList


@dataclass(frozen=True)
class Screened:
    events: list[dict[str, Any]]  # usable for segmentation
    erase: set[str]  # cookies whose stored data this batch removes


class IngestPrivacy:
    """Ingest's side: consent checks, the suppression list, and pending erasures."""

    def __init__(
        self,
        store: PrivacyStore,
        policy: ConsentPolicy,
        registry: CollectorRegistry,
        *,
        block_ms: int = 100,
    ) -> None:
        self.store = store
        self.policy = policy
        self.mirror = SuppressionList()
        self.follower = SuppressionFollower(
            store.client, self.mirror, prefix=store.prefix, block_ms=block_ms
        )
        self.refused = Counter(
            "dmp_privacy_events_without_consent_total",
            "Events not used for segmentation: no consent for the configured purposes.",
            ["reason"],
            registry=registry,
        )
        for reason in ("no_consent", "unreadable", "purposes", "vendor"):
            self.refused.labels(reason)
        self.suppressed = Counter(
            "dmp_privacy_events_suppressed_total",
            "Events of opted-out or erased cookies, not used.",
            registry=registry,
        )
        self.erased = Counter(
            "dmp_privacy_cookies_erased_total",
            "Cookies whose stored state ingest removed after an opt-out or erasure.",
            registry=registry,
        )
        self.lifted = Counter(
            "dmp_privacy_erasures_lifted_total",
            "Erased cookies segmented again after an event brought newer consent.",
            registry=registry,
        )

    async def screen(
        self, keys: PartitionKeys, events: Iterable[dict[str, Any]], due: Iterable[str] = ()
    ) -> Screened:
        usable: list[tuple[dict[str, Any], float]] = []
        for event in events:
            verdict = self.policy.verdict(event)
            if verdict.usable:
                usable.append((event, verdict.last_updated))
            else:
                self.refused.labels(verdict.reason).inc()
        erase = await self.store.pending(keys)
        if erase:  # suppressed in Redis: the mirror may not know yet
            for uid in await self.store.suppressed_among(sorted(erase)):
                self.mirror.add(uid)
        # Until the mirror has loaded, it names every cookie: Redis is asked about all.
        uids = [uid for uid in {e["uid"] for e, _ in usable} if self.mirror.blocks(uid)]
        suppressed = await self.store.suppressed_among(uids)
        kept: list[dict[str, Any]] = []
        for event, consent_time in usable:
            uid = event["uid"]
            entry = suppressed.get(uid)
            if entry is not None and entry.kind == ERASED and consent_time > entry.at:
                if await self.store.lift(uid):
                    self.lifted.inc()
                self.mirror.discard(uid)
                del suppressed[uid]
                entry = None
            if entry is not None:
                self.suppressed.inc()
                continue
            kept.append(event)
        # A suppressed cookie seen again keeps no state, even if its pending mark is gone.
        erase.update(suppressed)
        return Screened(kept, erase)

    def count_erased(self, erased: int) -> None:
        if erased:
            self.erased.inc(erased)


def ingest_privacy(
    client: aioredis.Redis, settings: Settings, registry: CollectorRegistry
) -> IngestPrivacy:
    return IngestPrivacy(
        PrivacyStore.from_settings(client, settings),
        ConsentPolicy(settings.privacy),
        registry,
        block_ms=settings.lookup.follow_block_ms,
    )
