"""The bidder client against real servers on 127.0.0.1: a slow one, a closed port, and the
real lookup app; deadlines, the circuit breaker and metrics."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from bidder_adapter.client import ClientConfig, ClientMetrics, DmpClient
from dmp.config import Settings
from dmp.lookup import REPLICA, create_lookup_app
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, BETA_KEY
from tests.bidder_adapter.stack import seed, with_partners
from tests.integration.conftest import wait_lookup_ready

FRAGMENT = {
    "user": {"data": [{"id": "dmp.example", "segment": [{"id": "x"}], "ext": {"segtax": 4}}]}
}
# Loose enough for a busy CI machine, far tighter than the server's delay.
SLACK = 0.03


@dataclass
class SlowServer:
    delay: float = 1.0
    hits: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(self.delay)
        return web.json_response(FRAGMENT)


@pytest.fixture
async def slow() -> AsyncIterator[SlowServer]:
    server = SlowServer()
    app = web.Application()
    app.router.add_post("/v1/openrtb/enrich", server.handle)
    app.router.add_get("/v1/partner/users/{user_id}/segments", server.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def state(client: DmpClient) -> str:
    # A call, not the attribute: mypy would keep the narrowing of one assert for the next.
    return client.breaker.state


def calls(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("dmp_client_calls_total", {"outcome": outcome}) or 0.0


async def timed(coro: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = await coro  # type: ignore[misc]  # any awaitable of the client
    return result, time.perf_counter() - started


async def test_slow_server_gives_an_empty_answer_within_the_deadline(slow: SlowServer) -> None:
    registry = CollectorRegistry()
    config = ClientConfig(base_url=slow.url, api_key="k", margin_ms=5)
    async with DmpClient(config, ClientMetrics.create(registry)) as client:
        answer, took = await timed(client.enrich({"id": "r", "tmax": 40}))
        assert answer == {}
        assert 0.035 - 0.005 <= took < 0.035 + SLACK  # tmax 40 less the 5 ms margin
        assert await client.segments("u", tmax_ms=25) == []
        answer, took = await timed(client.enrich({"id": "r", "tmax": 3}))
        assert answer == {}
        assert took < 0.005  # no time left: not even sent
    assert calls(registry, "timeout") == 2
    assert calls(registry, "no_time") == 1
    assert slow.hits == 2


async def test_down_server_gives_an_empty_answer_at_once(closed_port: int) -> None:
    registry = CollectorRegistry()
    config = ClientConfig(base_url=f"http://127.0.0.1:{closed_port}", api_key="k")
    async with DmpClient(config, ClientMetrics.create(registry)) as client:
        answer, took = await timed(client.enrich(b'{"id": "r"}', tmax_ms=50))
        assert answer == {}
        assert took < 0.045
        assert await client.segments("u") == []
    assert calls(registry, "error") == 2


async def test_circuit_opens_after_n_failures_and_closes_after_a_good_probe(
    slow: SlowServer,
) -> None:
    registry = CollectorRegistry()
    config = ClientConfig(
        base_url=slow.url, api_key="k", failure_threshold=3, reset_after_seconds=0.2
    )
    async with DmpClient(config, ClientMetrics.create(registry)) as client:
        for _ in range(3):
            assert await client.enrich({"tmax": 20}) == {}
        assert state(client) == "open"
        answer, took = await timed(client.enrich({"tmax": 20}))
        assert (answer, slow.hits) == ({}, 3)  # answered without a request
        assert took < 0.005
        assert calls(registry, "circuit_open") == 1
        assert registry.get_sample_value("dmp_client_circuit_state") == 2

        await asyncio.sleep(0.21)  # cool-down over: one probe, which fails (still slow)
        assert await client.enrich({"tmax": 20}) == {}
        assert slow.hits == 4
        assert state(client) == "open"
        assert await client.enrich({"tmax": 20}) == {}
        assert slow.hits == 4

        slow.delay = 0.0  # the server recovers
        await asyncio.sleep(0.21)
        assert await client.enrich({"tmax": 50}) == FRAGMENT  # the probe succeeds
        assert state(client) == "closed"
        assert await client.enrich({"tmax": 50}) == FRAGMENT
        assert slow.hits == 6
        assert registry.get_sample_value("dmp_client_circuit_state") == 0
    assert calls(registry, "ok") == 2


async def test_against_the_real_lookup_app(
    aiohttp_server: AiohttpServer, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> None:
    app = create_lookup_app(with_partners(settings, tmp_path), rules)
    server = await aiohttp_server(app)
    await wait_lookup_ready(app, 10)
    seed(app[REPLICA], "client-user", "auto_new_car_intent", "geo_socal")
    base = str(server.make_url(""))
    registry = CollectorRegistry()
    metrics = ClientMetrics.create(registry)  # one set of metrics, shared by both clients
    async with DmpClient(ClientConfig(base, ACME_KEY), metrics) as acme:
        fragment = await acme.enrich({"id": "r", "tmax": 100, "user": {"id": "client-user"}})
        assert fragment["user"]["data"][0]["segment"] == [
            {"id": "acme-new-vehicles"},
            {"id": "acme-socal-dealers"},
        ]
        assert await acme.enrich({"id": "r", "user": {"id": "nobody"}}) == {}
        assert await acme.segments("client-user") == ["acme-new-vehicles", "acme-socal-dealers"]
    async with DmpClient(ClientConfig(base, BETA_KEY)) as beta:
        assert await beta.segments("client-user") == ["56"]
        assert await beta.segments("client-user", id_type="buyeruid") == []  # 403: not allowed
    async with DmpClient(ClientConfig(base, "wrong-key"), metrics) as bad:
        assert await bad.enrich({"user": {"id": "client-user"}}) == {}  # 401
    assert calls(registry, "ok") == 2
    assert calls(registry, "empty") == 1
    assert calls(registry, "error") == 1
