"""Prometheus metrics, each set on its own registry (no process-wide default registry)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Fine enough to see a 2 ms SLO: tens of microseconds up to 100 ms.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class IngestMetrics:
    registry: CollectorRegistry
    events_consumed: Counter
    events_applied: Counter
    events_rejected: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    redis_transaction_seconds: Histogram
    membership_changes: Counter
    fenced: Counter
    assigned_partitions: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> IngestMetrics:
        r = registry or CollectorRegistry()
        return cls(
            registry=r,
            events_consumed=Counter(
                "dmp_ingest_events_consumed_total", "Events read from Kafka.", registry=r
            ),
            events_applied=Counter(
                "dmp_ingest_events_applied_total", "Events applied to cookie state.", registry=r
            ),
            events_rejected=Counter(
                "dmp_ingest_events_rejected_total",
                "Events sent to the dead-letter topic, by reason class.",
                ["reason"],
                registry=r,
            ),
            batch_size=Histogram(
                "dmp_ingest_batch_events",
                "Events per partition batch.",
                buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
                registry=r,
            ),
            batch_seconds=Histogram(
                "dmp_ingest_batch_duration_seconds",
                "Time to evaluate and commit one partition batch.",
                registry=r,
            ),
            redis_transaction_seconds=Histogram(
                "dmp_ingest_redis_transaction_duration_seconds",
                "Time of the Redis transaction that commits a batch.",
                registry=r,
            ),
            membership_changes=Counter(
                "dmp_ingest_membership_changes_total",
                "Segment memberships added or removed.",
                ["change"],
                registry=r,
            ),
            fenced=Counter(
                "dmp_ingest_fenced_total",
                "Batches refused because another consumer owned the partition.",
                registry=r,
            ),
            assigned_partitions=Gauge(
                "dmp_ingest_assigned_partitions", "Partitions this consumer owns.", registry=r
            ),
        )


@dataclass(frozen=True)
class LookupMetrics:
    registry: CollectorRegistry
    request_seconds: Histogram
    in_flight: Gauge
    ready: Gauge
    memberships: Gauge
    cookies: Gauge
    changes_applied: Counter
    freshness_seconds: Histogram
    follow_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> LookupMetrics:
        r = registry or CollectorRegistry()
        return cls(
            registry=r,
            request_seconds=Histogram(
                "dmp_lookup_request_duration_seconds",
                "Lookup request handling time.",
                ["endpoint", "status"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            in_flight=Gauge("dmp_lookup_requests_in_flight", "Requests being handled.", registry=r),
            ready=Gauge(
                "dmp_lookup_ready", "1 when the replica has loaded its snapshot.", registry=r
            ),
            memberships=Gauge(
                "dmp_replica_memberships", "Base segment memberships held in memory.", registry=r
            ),
            cookies=Gauge(
                "dmp_replica_cookies", "Cookie positions known to the replica.", registry=r
            ),
            changes_applied=Counter(
                "dmp_replica_changes_applied_total",
                "Change-stream entries applied by the replica.",
                registry=r,
            ),
            freshness_seconds=Histogram(
                "dmp_replica_freshness_seconds",
                "From the newest Kafka produce time in a batch to visible in this replica.",
                buckets=FRESHNESS_BUCKETS,
                registry=r,
            ),
            follow_errors=Counter(
                "dmp_replica_follow_errors_total",
                "Errors while following the change stream (Redis unreachable etc.).",
                registry=r,
            ),
        )
