"""Metric names follow Prometheus conventions, and several processes share one /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dmp.config import Settings
from dmp.metrics import (
    REJECT_REASONS,
    IngestMetrics,
    LookupMetrics,
    mark_worker_dead,
    prepare_multiproc_dir,
)
from tests.conftest import REPO

UNIT_SUFFIXES = ("_seconds", "_bytes", "_messages", "_events", "_info")
# Gauges that count things or state a boolean, where Prometheus style wants no unit.
UNITLESS_GAUGES = {
    "dmp_ingest_assigned_partitions",
    "dmp_kafka_connected",
    "dmp_redis_connected",
    "dmp_lookup_requests_in_flight",
    "dmp_lookup_ready",
    "dmp_replica_memberships",
    "dmp_replica_cookies",
}
FORBIDDEN_LABELS = {"uid", "user", "user_id", "cookie", "cookie_id", "id", "ip", "url"}


def _families(registry: CollectorRegistry) -> list[tuple[str, str, list[str]]]:
    """(exposed name, type, label names) of every dmp_ family."""
    out = []
    for family in registry.collect():
        if not family.name.startswith("dmp_"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = sorted({k for s in family.samples for k in s.labels if k != "le"})
        out.append((name, family.type, labels))
    return out


@pytest.mark.parametrize("metrics_class", [IngestMetrics, LookupMetrics])
def test_names_carry_units_and_labels_are_bounded(
    metrics_class: type[IngestMetrics] | type[LookupMetrics],
) -> None:
    families = _families(metrics_class.create().registry)
    assert len(families) >= 10
    for name, kind, labels in families:
        if kind == "counter":
            assert name.endswith("_total"), name
        elif name not in UNITLESS_GAUGES:
            assert name.endswith(UNIT_SUFFIXES), f"{name}: no unit suffix"
        assert not FORBIDDEN_LABELS & set(labels), f"{name} has a per-user label: {labels}"


def test_counters_with_labels_start_at_zero() -> None:
    """Alerts take rate() of these: the series must exist before the first event."""
    ingest = IngestMetrics.create().render().decode()
    for reason in REJECT_REASONS:
        assert f'dmp_ingest_events_rejected_total{{reason="{reason}"}} 0.0' in ingest
    lookup = LookupMetrics.create().render().decode()
    assert 'dmp_lookup_deadline_empty_answers_total{partner="none"} 0.0' in lookup


def test_rule_set_info_shows_the_version_prefix() -> None:
    metrics = LookupMetrics.create()
    metrics.set_rule_set("0123456789abcdef" * 4)
    assert 'dmp_rule_set_info{version="0123456789ab"} 1.0' in metrics.render().decode()


def test_segment_populations_render_like_prometheus_client() -> None:
    """The hand-rendered family parses as the same samples, odd characters included."""
    metrics = LookupMetrics.create()
    odd = 'quote"back\\slash\nnewline'
    for segment, members in (("geo_socal", 3), (odd, 7), ("geo_socal", 4)):
        metrics.segment_members.set(segment, members)
    samples = _samples(metrics.render())
    assert samples[("dmp_replica_segment_members", (("segment", "geo_socal"),))] == 4
    assert samples[("dmp_replica_segment_members", (("segment", odd),))] == 7
    families = {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["dmp_replica_segment_members"] == "gauge"


def test_revoked_partition_lag_disappears() -> None:
    metrics = IngestMetrics.create()
    metrics.consumer_lag.labels("3").set(42)
    assert 'dmp_ingest_consumer_lag_messages{partition="3"} 42.0' in metrics.render().decode()
    metrics.forget_partition(3)
    assert "dmp_ingest_consumer_lag_messages{" not in metrics.render().decode()


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dmp.metrics import LookupMetrics, NO_PARTNER

    requests, ready, members = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    m = LookupMetrics.create(multiproc_dir=Path(sys.argv[4]))
    for _ in range(requests):
        m.request_seconds.labels("/v1/users/{uid}/segments", "200", NO_PARTNER).observe(0.0004)
    m.in_flight.inc()
    m.ready.set(ready)
    m.segment_members.set("geo_socal", members)
    m.set_rule_set("abcdef0123456789")
    """
)


def _pids(folder: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("*.db")}


def _run_worker(folder: Path, requests: int, ready: int, members: int) -> int:
    """Run one worker process to completion; its pid names its files."""
    before = _pids(folder)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(requests), str(ready), str(members), str(folder)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (pid,) = _pids(folder) - before
    return pid


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            sample: Sample = s
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_several_processes_share_one_exposition(tmp_path: Path) -> None:
    """Two real worker processes write files; any process renders their merged values."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"stale")
    prepare_multiproc_dir(folder)
    assert not list(folder.glob("*.db")), "files of an earlier run must go"

    _run_worker(folder, requests=3, ready=1, members=10)
    second = _run_worker(folder, requests=2, ready=0, members=12)

    settings = Settings.from_env({"PROMETHEUS_MULTIPROC_DIR": str(folder)})
    assert settings.prometheus_multiproc_dir == folder
    reader = LookupMetrics.create(multiproc_dir=settings.prometheus_multiproc_dir)
    reader.segment_members.set("geo_socal", 11)  # the scraped worker's own replica
    body = reader.render()
    samples = _samples(body)
    route = (("endpoint", "/v1/users/{uid}/segments"), ("partner", "none"), ("status", "200"))
    assert samples[("dmp_lookup_request_duration_seconds_count", route)] == 5
    assert samples[("dmp_lookup_requests_in_flight", ())] == 2  # livesum
    assert samples[("dmp_lookup_ready", ())] == 0  # livemin: one worker not ready
    assert samples[("dmp_replica_segment_members", (("segment", "geo_socal"),))] == 11
    assert body.count(b"dmp_replica_segment_members{") == 1
    assert samples[("dmp_rule_set_info", (("version", "abcdef012345"),))] == 1
    assert not any(name.startswith("process_") for name, _ in samples)

    # The supervisor reaps the worker that was not ready: live gauges forget it, counters keep it.
    mark_worker_dead(folder, second)
    samples = _samples(reader.render())
    assert samples[("dmp_lookup_ready", ())] == 1
    assert samples[("dmp_lookup_requests_in_flight", ())] == 1
    assert samples[("dmp_lookup_request_duration_seconds_count", route)] == 5
