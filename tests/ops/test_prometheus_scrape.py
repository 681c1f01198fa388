"""A real Prometheus (Debian package, started by deploy/prometheus.sh) scrapes a running ingest
and lookup, evaluates the rules, and answers every rule, alert and dashboard query."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer

from dmp.config import Settings
from dmp.lookup import create_lookup_app
from dmp.services import _serve_metrics
from segment_rules import CompiledRules
from tests.conftest import REPO
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import new_car_view, produce
from tests.ops.conftest import PROMETHEUS_DIR
from tests.ops.test_logs import free_port

pytestmark = pytest.mark.integration
SCRIPT = REPO / "deploy" / "prometheus.sh"
DASHBOARD = REPO / "deploy" / "grafana" / "dmp.json"
# Grafana's variables, as an operator would pick them: every partner, a one-minute rate.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$partner": ".*"}

# Series that must have data once events and lookups have flowed: the raw metrics the rules
# read and what the rules themselves recorded inside this Prometheus.
KEY_SERIES = (
    'up{job="dmp-ingest"} == 1',
    'up{job="dmp-lookup"} == 1',
    'dmp_lookup_request_duration_seconds_bucket{endpoint="/v1/users/{uid}/segments", le="0.002"}',
    'dmp_replica_freshness_seconds_bucket{le="1.0"}',
    'dmp_ingest_events_rejected_total{reason="invalid_json"} > 0',
    'dmp_rule_set_info{job="dmp-ingest"}',
    'dmp_rule_set_info{job="dmp-lookup"}',
    "dmp_kafka_connected == 1",
    'dmp_redis_connected{job="dmp-ingest"} == 1',
    'dmp_redis_connected{job="dmp-lookup"} == 1',
    "dmp_lookup_ready == 1",
    'dmp_replica_segment_members{segment="geo_socal"} > 0',
    "dmp:slo_lookup_latency:error_ratio_rate5m",
    "dmp:slo_lookup_availability:error_ratio_rate5m",
    "dmp:slo_freshness:error_ratio_rate5m",
    "dmp:slo_ingest_errors:error_ratio_rate5m > 0",
    "dmp:lookup_requests:rate1m",
    "dmp:lookup_request_duration_seconds:p99_1m",
    "dmp:ingest_events_consumed:rate1m > 0",
    "dmp:ingest_events_rejected:rate1m",
    "dmp:ingest_consumer_lag_messages:max_by_partition",
    "dmp:segment_members:max_by_segment",
    "dmp:replica_freshness_seconds:p99_5m",
)
# Dashboard panels that must draw something in this run (the others need partners, a past
# hour, or failures that this test does not cause).
PANELS_WITH_DATA = (
    "Bid-time lookups within 2 ms (1 h)",
    "Change batches visible within 1 s (1 h)",
    "Requests by endpoint",
    "Bid-time latency percentiles",
    "Responses by status",
    "Requests by partner",
    "Freshness (produce to visible in a replica)",
    "Events",
    "Dead-lettered by reason",
    "Consumer lag by partition",
    "Ingest step time (p99)",
    "Segment populations (largest 20)",
    "Ready, Redis and Kafka connections",
    "Replica size",
    "Rule-set version in force",
)


@dataclass
class Prometheus:
    url: str
    session: aiohttp.ClientSession

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.url + path, params=params) as response:
            body = await response.read()
            assert response.status == 200, f"{path} {params}: HTTP {response.status} {body!r}"
        doc = orjson.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    async def query(self, expr: str) -> list[Any]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[Any] = data["result"]
        return result


async def run_script(env: dict[str, str], *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPT),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    text = out.decode()
    assert proc.returncode == 0, f"deploy/prometheus.sh {' '.join(args)} failed:\n{text}"
    return text


@pytest.fixture
async def lookup_port(settings: Settings, rules: CompiledRules) -> AsyncIterator[int]:
    app = create_lookup_app(settings, rules)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await wait_lookup_ready(app, 15)
    port: int = runner.addresses[0][1]
    yield port
    await runner.cleanup()


def rule_expressions() -> list[tuple[str, str]]:
    out = []
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("record") or rule["alert"], rule["expr"]))
    return out


def dashboard_expressions() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for annotation in doc["annotations"]["list"]:
        out.append((f"annotation {annotation['name']}", annotation["expr"]))
    substituted = []
    for title, expr in out:
        for name, value in DASHBOARD_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{title}: unknown dashboard variable in {expr}"
        substituted.append((title, expr))
    return substituted


async def test_real_prometheus_scrapes_and_answers_every_query(
    tmp_path: Path,
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    lookup_port: int,
) -> None:
    started = time.monotonic()
    ingest = await start_ingest()
    metrics_runner = await _serve_metrics(ingest.service.metrics, "127.0.0.1", 0)
    ingest_port = metrics_runner.addresses[0][1]
    prom_port = free_port()
    env = {
        **os.environ,
        "DMP_STATE_DIR": str(tmp_path / "state"),
        "DMP_PROMETHEUS_PORT": str(prom_port),
        "DMP_PROMETHEUS_INGEST_TARGETS": f"127.0.0.1:{ingest_port}",
        "DMP_PROMETHEUS_LOOKUP_TARGETS": f"127.0.0.1:{lookup_port}",
        "DMP_PROMETHEUS_SCRAPE_INTERVAL": "1s",
    }
    await run_script(env, "start")
    try:
        async with aiohttp.ClientSession() as session:
            prom = Prometheus(f"http://127.0.0.1:{prom_port}", session)
            # A first scrape before any event, so that rate() sees the counters move.
            deadline = time.monotonic() + 15
            while len(await prom.query('up{job=~"dmp-.*"} == 1')) < 2:
                assert time.monotonic() < deadline, "Prometheus never scraped both services"
                await asyncio.sleep(0.2)
            await exercise(settings, producer, session, lookup_port)
            await check_everything(prom)
    finally:
        await run_script(env, "stop")
        await metrics_runner.cleanup()
    assert time.monotonic() - started < 60


async def exercise(
    settings: Settings,
    producer: AIOKafkaProducer,
    session: aiohttp.ClientSession,
    lookup_port: int,
) -> None:
    """Events through Kafka (one of them refused), then lookups: hits, misses, a 400."""
    events = [new_car_view(f"scraped-{n}", age) for n in range(20) for age in (3, 1)]
    await produce(producer, settings.kafka.topic, events)
    await producer.send_and_wait(settings.kafka.topic, b"{broken", key=b"scraped-bad")
    base = f"http://127.0.0.1:{lookup_port}"
    deadline = time.monotonic() + 15
    while True:
        async with session.get(f"{base}/v1/users/scraped-0/segments") as response:
            assert response.status == 200
            if (await response.json())["segments"]:
                break
        assert time.monotonic() < deadline, "events never became segments"
        await asyncio.sleep(0.05)
    for n in range(50):
        async with session.get(f"{base}/v1/users/scraped-{n}/segments") as response:
            assert response.status == 200
    async with session.get(f"{base}/v1/users/{'x' * 200}/segments") as response:
        assert response.status == 400


async def check_everything(prom: Prometheus) -> None:
    # Scraped, and the rules evaluated on what was scraped (they run every second here).
    deadline = time.monotonic() + 30
    while missing := [e for e in KEY_SERIES if not await prom.query(e)]:
        assert time.monotonic() < deadline, f"no data for: {missing}"
        await asyncio.sleep(0.5)

    targets = await prom.get("/api/v1/targets")
    assert {t["labels"]["job"]: t["health"] for t in targets["activeTargets"]} == {
        "dmp-ingest": "up",
        "dmp-lookup": "up",
    }

    # Every rule loaded and evaluated without error inside Prometheus.
    expressions = rule_expressions()
    groups = (await prom.get("/api/v1/rules"))["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert len(loaded) == len(expressions)
    assert [r["name"] for r in loaded if r["health"] != "ok"] == []

    # Every recording rule, alert and dashboard expression parses and evaluates.
    for _, expr in [*expressions, *dashboard_expressions()]:
        await prom.query(expr)

    answers = {title: await prom.query(expr) for title, expr in dashboard_expressions()}
    empty = sorted({t for t, result in answers.items() if not result} & set(PANELS_WITH_DATA))
    assert empty == [], f"dashboard panels without data: {empty}"
    partners = await prom.get(
        "/api/v1/label/partner/values", **{"match[]": "dmp_lookup_request_duration_seconds_count"}
    )
    assert "none" in partners  # the dashboard's partner variable has values to offer
