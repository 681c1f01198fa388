"""Prometheus metrics, each set on its own registry (no process-wide default registry).

Naming follows Prometheus conventions: a unit suffix on every measured quantity, ``_total`` on
counters, and label values drawn from bounded sets (endpoint routes, HTTP status, partner ids,
segment ids from the rule file, Kafka partitions): never a cookie id.

Several worker processes per service: when ``PROMETHEUS_MULTIPROC_DIR`` is set (read by
``dmp.config``; prometheus-client reads the same variable when it is imported to choose its
value store), every process writes its values to memory-mapped files in that folder and
``render`` merges them. Each gauge declares how the processes' values combine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector

from dmp.latency_histogram import LatencyHistogram

log = logging.getLogger(__name__)

# Fine enough to see a 2 ms SLO: tens of microseconds up to 100 ms.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
    0.0075, 0.01, 0.025, 0.05, 0.1,
)  # fmt: skip
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Ingest steps: a Redis transaction takes well under a millisecond when small.
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10000)

# The bounded set dmp.dead_letter.reason_class maps every refusal into; created at zero so
# that rate() and the dead-letter alerts see a series before the first refusal.
REJECT_REASONS = ("invalid_json", "too_large", "bad_timestamp", "bad_key", "empty", "schema")
# Requests no partner was authenticated for carry this partner label.
NO_PARTNER = "none"
# A handler that has authenticated a partner sets request[PARTNER_LABEL] = partner_id; the
# lookup app labels the request's metrics with it. Partner ids come from the partner
# file, so the label set stays bounded (never set it from unauthenticated input).
PARTNER_LABEL = web.RequestKey("dmp_partner_label", str)
# The X-Dmp-Outcome value of an answer sent empty because the caller's deadline was too short.
DEADLINE_OUTCOME = "tmax"
# The header a partner answer carries its outcome in (read back for the metrics).
OUTCOME_HEADER = "X-Dmp-Outcome"
VERSION_PREFIX = 12  # characters of the rule file's sha256 shown in dmp_rule_set_info

CONTENT_TYPE = CONTENT_TYPE_LATEST


def _render(registry: CollectorRegistry, multiproc_dir: Path | None) -> bytes:
    if multiproc_dir is None:
        return generate_latest(registry)
    merged = CollectorRegistry()
    # prometheus-client leaves the multiprocess module untyped.
    _multiprocess.MultiProcessCollector(merged, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    return generate_latest(merged)


def _with_process_metrics(registry: CollectorRegistry, multiproc_dir: Path | None) -> None:
    # process_* describe only the process that answers the scrape, which in multiprocess
    # mode would be a different worker each time: leave them out there.
    if multiproc_dir is None:
        ProcessCollector(registry=registry)


class SegmentPopulations:
    """Members per base segment, rendered here rather than by prometheus-client.

    With 1,000 segments, prometheus-client's generic exposition of this one family costs
    about 5 ms per scrape on the lookup's event loop (and more merged from files);
    pre-escaped lines cost a small part of it (loadtests/metrics_cost.py). In multiprocess
    mode every worker follows the same change streams, so the scraped worker's values stand
    for all.
    """

    NAME = "dmp_replica_segment_members"
    HELP = (
        "Members of each base segment as this replica holds them, paused ones included "
        "(built, hidden from lookups)."
    )

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._prefixes: dict[str, str] = {}

    def set(self, segment: str, members: int) -> None:
        if segment not in self._prefixes:
            label = segment.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
            self._prefixes[segment] = f'{self.NAME}{{segment="{label}"}} '
        self._values[segment] = members

    def get(self, segment: str) -> int | None:
        return self._values.get(segment)

    def render(self) -> bytes:
        if not self._values:
            return b""
        lines = [f"# HELP {self.NAME} {self.HELP}\n# TYPE {self.NAME} gauge\n"]
        prefixes = self._prefixes
        lines += [f"{prefixes[s]}{n}\n" for s, n in self._values.items()]
        return "".join(lines).encode()


def prepare_multiproc_dir(path: Path) -> None:
    """Create the folder and delete files left by earlier runs (call once, before forking).

    Stale files would otherwise add a dead process's counters to the new ones.
    """
    path.mkdir(parents=True, exist_ok=True)
    stale = list(path.glob("*.db"))
    for file in stale:
        file.unlink()
    if stale:
        log.info("removed %d metric files of an earlier run from %s", len(stale), path)


def mark_worker_dead(path: Path, pid: int) -> None:
    """Drop an exited worker's live gauges (a supervisor calls this when a worker exits)."""
    _multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]  # untyped


def short_version(version: str) -> str:
    return version[:VERSION_PREFIX]


def set_version_info(info: Gauge, version: str, multiproc_dir: Path | None) -> None:
    """Report ``version`` as the one in force: only its series reads 1.

    Two series at 1 after a hot reload would look like a half-rolled fleet
    (DMPRuleSetVersionMismatch counts the series equal to 1).
    """
    label = short_version(version)
    if multiproc_dir is None:
        info.clear()
    else:  # clear() does not reach the shared files: zero what this process had set
        for (old,) in list(info._metrics):  # prometheus-client keeps no public list
            if old != label:
                info.labels(old).set(0)
    info.labels(label).set(1)


@dataclass(frozen=True)
class IngestMetrics:
    registry: CollectorRegistry
    multiproc_dir: Path | None
    events_consumed: Counter
    events_applied: Counter
    events_rejected: Counter
    batch_size: Histogram
    batch_seconds: Histogram
    redis_transaction_seconds: Histogram
    rule_evaluation_seconds: Histogram
    produce_to_commit_seconds: Histogram
    membership_changes: Counter
    fenced: Counter
    assigned_partitions: Gauge
    consumer_lag: Gauge
    kafka_connected: Gauge
    redis_connected: Gauge
    rule_set: Gauge

    @classmethod
    def create(
        cls, registry: CollectorRegistry | None = None, multiproc_dir: Path | None = None
    ) -> IngestMetrics:
        r = registry or CollectorRegistry()
        _with_process_metrics(r, multiproc_dir)
        metrics = cls(
            registry=r,
            multiproc_dir=multiproc_dir,
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
                buckets=BATCH_SIZE_BUCKETS,
                registry=r,
            ),
            batch_seconds=Histogram(
                "dmp_ingest_batch_duration_seconds",
                "Time to decode, evaluate and commit one partition batch.",
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            redis_transaction_seconds=Histogram(
                "dmp_ingest_redis_transaction_duration_seconds",
                "Time of the Redis transaction that commits a batch.",
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            rule_evaluation_seconds=Histogram(
                "dmp_ingest_rule_evaluation_duration_seconds",
                "Time to evaluate the rules over one partition batch (no I/O).",
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            produce_to_commit_seconds=Histogram(
                "dmp_ingest_produce_to_commit_seconds",
                "From the newest Kafka produce time in a batch to its Redis commit.",
                buckets=FRESHNESS_BUCKETS,
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
                "Writes refused because another writer moved the partition's offset (re-read).",
                registry=r,
            ),
            assigned_partitions=Gauge(
                "dmp_ingest_assigned_partitions",
                "Partitions this consumer owns.",
                registry=r,
                multiprocess_mode="livesum",
            ),
            consumer_lag=Gauge(
                "dmp_ingest_consumer_lag_messages",
                "Kafka highwater minus this consumer's position, per owned partition.",
                ["partition"],
                registry=r,
                multiprocess_mode="livemax",
            ),
            kafka_connected=Gauge(
                "dmp_kafka_connected",
                "1 when the consumer owns partitions and fetched from each of them recently.",
                registry=r,
                multiprocess_mode="livemin",
            ),
            redis_connected=Gauge(
                "dmp_redis_connected",
                "1 when the last Redis command succeeded.",
                registry=r,
                multiprocess_mode="livemin",
            ),
            rule_set=Gauge(
                "dmp_rule_set_info",
                "The rule file in force (version = first characters of its sha256).",
                ["version"],
                registry=r,
                multiprocess_mode="livemax",
            ),
        )
        for reason in REJECT_REASONS:
            metrics.events_rejected.labels(reason)
        for change in ("added", "removed"):
            metrics.membership_changes.labels(change)
        return metrics

    def render(self) -> bytes:
        return _render(self.registry, self.multiproc_dir)

    def set_rule_set(self, version: str) -> None:
        set_version_info(self.rule_set, version, self.multiproc_dir)

    def forget_partition(self, partition: int) -> None:
        """A revoked partition: its lag is now another consumer's to report."""
        if self.multiproc_dir is None:
            self.consumer_lag.remove(str(partition))
        else:
            # Label removal does not reach the shared files; zero loses to the owner in livemax.
            self.consumer_lag.labels(str(partition)).set(0)


def _request_histogram(
    registry: CollectorRegistry, multiproc_dir: Path | None
) -> Histogram | LatencyHistogram:
    """Every lookup request is observed: in one process without prometheus-client's locks
    (dmp/latency_histogram.py); worker processes need its shared files."""
    name = "dmp_lookup_request_duration_seconds"
    doc = "Lookup request handling time, by route, HTTP status and partner."
    labels = ["endpoint", "status", "partner"]
    if multiproc_dir is None:
        return LatencyHistogram(name, doc, labels, LATENCY_BUCKETS, registry)
    return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=registry)


@dataclass(frozen=True)
class LookupMetrics:
    registry: CollectorRegistry
    multiproc_dir: Path | None
    request_seconds: Histogram | LatencyHistogram
    in_flight: Gauge
    deadline_empty: Counter
    ready: Gauge
    memberships: Gauge
    cookies: Gauge
    segment_members: SegmentPopulations
    bitmap_bytes: Gauge
    change_stream_lag: Gauge
    changes_applied: Counter
    freshness_seconds: Histogram
    follow_errors: Counter
    redis_connected: Gauge
    rule_set: Gauge
    shard: Gauge

    @classmethod
    def create(
        cls, registry: CollectorRegistry | None = None, multiproc_dir: Path | None = None
    ) -> LookupMetrics:
        r = registry or CollectorRegistry()
        _with_process_metrics(r, multiproc_dir)
        metrics = cls(
            registry=r,
            multiproc_dir=multiproc_dir,
            request_seconds=_request_histogram(r, multiproc_dir),
            in_flight=Gauge(
                "dmp_lookup_requests_in_flight",
                "Requests being handled.",
                registry=r,
                multiprocess_mode="livesum",
            ),
            deadline_empty=Counter(
                "dmp_lookup_deadline_empty_answers_total",
                "Answers sent empty because the caller's deadline would have been missed.",
                ["partner"],
                registry=r,
            ),
            ready=Gauge(
                "dmp_lookup_ready",
                "1 when the replica has loaded its snapshot.",
                registry=r,
                multiprocess_mode="livemin",
            ),
            memberships=Gauge(
                "dmp_replica_memberships",
                "Base segment memberships held in memory.",
                registry=r,
                multiprocess_mode="livemax",
            ),
            cookies=Gauge(
                "dmp_replica_cookies",
                "Cookie positions known to the replica.",
                registry=r,
                multiprocess_mode="livemax",
            ),
            segment_members=SegmentPopulations(),
            bitmap_bytes=Gauge(
                "dmp_replica_bitmap_bytes",
                "Bytes of roaring containers in the replica's membership index.",
                registry=r,
                multiprocess_mode="livemax",
            ),
            change_stream_lag=Gauge(
                "dmp_replica_change_stream_lag_seconds",
                "Seconds since this replica last read to the end of every change stream.",
                registry=r,
                multiprocess_mode="livemax",
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
            redis_connected=Gauge(
                "dmp_redis_connected",
                "1 when the replica's last Redis read succeeded.",
                registry=r,
                multiprocess_mode="livemin",
            ),
            rule_set=Gauge(
                "dmp_rule_set_info",
                "The rule file in force (version = first characters of its sha256).",
                ["version"],
                registry=r,
                multiprocess_mode="livemax",
            ),
            shard=Gauge(
                "dmp_replica_shard_info",
                "The id shard this replica holds (DMP_LOOKUP_SHARD; all: every partition).",
                ["shard", "partitions"],
                registry=r,
                multiprocess_mode="livemax",
            ),
        )
        metrics.deadline_empty.labels(NO_PARTNER)
        return metrics

    def render(self) -> bytes:
        return _render(self.registry, self.multiproc_dir) + self.segment_members.render()

    def set_rule_set(self, version: str) -> None:
        set_version_info(self.rule_set, version, self.multiproc_dir)
