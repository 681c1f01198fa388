"""Each load test at a tiny size, so none of them can rot. Nothing here judges performance:
only that each runs against the real stack and writes a well-formed result and chart."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from dmp.config import Settings
from loadtests import ingest, lookup, memory, scaleout
from loadtests.datagen import delete_prefix

pytestmark = pytest.mark.integration


def _result(folder: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((folder / f"{name}.json").read_bytes())
    assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["test"] == name
    assert doc["budgets"]
    assert all(isinstance(v, bool) for v in doc["budgets"].values())
    return doc


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture
def prefix(stack: Settings) -> Any:
    name = f"lt-smoke-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(stack.redis.url)
    try:
        delete_prefix(client, name)
    finally:
        client.close()


def test_lookup_smoke(prefix: str, tmp_path: Path) -> None:
    lookup.main(
        [
            *("--cookies", "5000", "--segments", "20", "--runs", "1", "--duration", "1"),
            *("--rates", "0.2", "--batch-users", "10", "--connections", "8"),
            *("--prefix", prefix, "--results", str(tmp_path)),
        ]
    )
    doc = _result(tmp_path, "lookup")
    closed = doc["closed_loop"]
    assert _positive(closed["bare_rps"])
    assert _positive(closed["ours_rps"])
    level = doc["open_loop"][0]
    for server in ("bare", "ours"):
        assert _positive(level[server]["p99_ms"])
        assert level[server]["p50_ms"] <= level[server]["max_ms"]
    assert _positive(doc["batch"]["user_lookups_per_s"])
    assert doc["kafka_running"] is True  # the test stack runs a broker: the warning's case


def test_ingest_smoke(stack: Settings, tmp_path: Path) -> None:
    ingest.main(
        [
            *("--events", "2000", "--cookies", "10000", "--segments", "10", "--runs", "1"),
            *("--freshness-segments", "10", "--freshness-seconds", "2"),
            *("--freshness-runs", "2", "--results", str(tmp_path)),
        ]
    )
    doc = _result(tmp_path, "ingest")
    assert _positive(doc["decode_only"]["events_per_s"])
    assert _positive(doc["write_floor"]["events_per_s"])
    assert doc["write_floor"]["ratio_to_decode_only"] > 0
    assert _positive(doc["write_floor"]["redis_cpu_us_per_event"])
    assert [r["segments"] for r in doc["ingest"]] == [10]
    assert _positive(doc["ingest"][0]["events_per_s"])
    fresh = doc["freshness"]
    assert fresh["probes"] > 0
    assert fresh["lost_probes"] == 0
    assert _positive(fresh["p99_s"])
    # Two runs: the reported one is the lower middle, i.e. the one with the lower p99.
    assert len(fresh["runs"]) == 2
    assert fresh["p99_s"] == min(r["p99_s"] for r in fresh["runs"])
    assert fresh["runs"][fresh["median_run"]]["p99_s"] == fresh["p99_s"]
    assert all(r["lost_probes"] == 0 for r in fresh["runs"])


def test_memory_smoke(prefix: str, tmp_path: Path) -> None:
    memory.main(
        [
            *("--cookies", "20000", "--populations", "1000", "--segments", "20"),
            *("--runs", "1", "--prefix", prefix, "--results", str(tmp_path)),
        ]
    )
    doc = _result(tmp_path, "memory")
    assert [r["population"] > 0 for r in doc["redis"]] == [True]
    assert all(_positive(r["memory_usage_bytes_per_member"]) for r in doc["redis"])
    assert len(doc["replica"]) == 1
    full = doc["full_dataset"]
    assert _positive(full["ready_from_bitmaps_s"])
    assert _positive(full["ready_from_snapshots_s"])


def test_scaleout_smoke(prefix: str, tmp_path: Path) -> None:
    scaleout.main(
        [
            *("--lookup-prefix", prefix),
            *("--events", "2000", "--cookies", "10000", "--segments", "10", "--runs", "1"),
            *("--lookup-cookies", "5000", "--lookup-segments", "20", "--duration", "1"),
            *("--results", str(tmp_path)),
        ]
    )
    doc = _result(tmp_path, "scaleout")
    assert doc["ingest"]["final_state_equal"] == [True]
    assert _positive(doc["ingest"]["ratio"])
    assert _positive(doc["lookup"]["ratio"])


def test_scaleout_shards_smoke(prefix: str, tmp_path: Path) -> None:
    scaleout.main(
        [
            *("--mode", "shards", "--shard-prefix", prefix),
            *("--shard-cookies", "5000", "--shard-segments", "20", "--runs", "1"),
            *("--shard-duration", "0.5", "--shard-check", "200", "--results", str(tmp_path)),
        ]
    )
    doc = _result(tmp_path, "scaleout_shards")
    # The sharded client's answers were compared with the single replica's before measuring.
    assert doc["budgets"] == {
        "sharded_lookups_equal_single": True,
        "sharded_enrich_equal_single": True,
        "no_failed_calls": True,
    }
    assert doc["checks"]["lookups"] > 50
    assert doc["checks"]["enrich_requests"] == 20
    for kind in ("closed", "open", "enrich_known", "enrich_new"):
        for client in ("single", "sharded"):
            m = doc["medians"][kind][client]
            assert _positive(m["per_s"])
            assert 0 < m["p50_ms"] <= m["p99_ms"] <= m["p99.9_ms"] <= m["max_ms"]
        assert _positive(doc["ratios_sharded_over_single"][kind]["per_s"])
