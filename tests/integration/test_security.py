"""Keys, limits and error bodies of the lookup app (a real app on a real socket)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from bidder_adapter.profiles import hash_api_key
from dmp.config import Settings
from dmp.limits import PARSER_LIMITS, RateLimiter
from dmp.lookup import FOLLOWER, create_lookup_app
from dmp.privacy_routes import PRIVACY_FOLLOWER
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, ADMIN_KEY, BETA_KEY, partner_yaml
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce
from tests.integration.test_restart import wait_until_offsets

Client = TestClient[Any, Any]
ALL = ["auto_new_car_intent", "geo_socal", "new_car_socal"]
# What an error body must never show: a traceback, a source path, a Redis key or internals.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|/work/|/tmp/|/usr/|site-packages|redis\.|aiohttp\.|0x[0-9a-f]{6,}"
    r"|\{[^}]*:\d+\}|test-[0-9a-f]{10}|Exception",
    re.IGNORECASE,
)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def secured(settings: Settings, tmp_path: Path, **security: Any) -> Settings:
    partners = tmp_path / "partners.yaml"
    partners.write_text(partner_yaml())
    return replace(
        settings,
        partners_path=partners,
        partner=replace(
            settings.partner, admin_key_sha256=hash_api_key(ADMIN_KEY), max_batch_users=10
        ),
        security=replace(settings.security, **security),
    )


async def serve(aiohttp_client: AiohttpClient, s: Settings, rules: CompiledRules) -> Client:
    app = create_lookup_app(s, rules)
    client = await aiohttp_client(app, server_kwargs=dict(PARSER_LIMITS))
    await wait_until(
        lambda: app[FOLLOWER].ready.is_set() and app[PRIVACY_FOLLOWER].ready.is_set(), 10, "ready"
    )
    return client


async def error_of(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    doc = await response.json()
    assert set(doc) >= {"error"}
    message: str = doc["error"]
    assert message
    assert not LEAKS.search(await response.text()), await response.text()
    return message


async def test_limits_each_answer_with_a_clear_json_error(
    settings: Settings, rules: CompiledRules, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    s = secured(settings, tmp_path, max_body_bytes=4096, rate_per_second=5.0, rate_burst=5.0)
    client = await serve(aiohttp_client, s, rules)
    batch = "/v1/partner/segments/batch"

    many = {f"X-Filler-{n}": "x" * 1000 for n in range(9)}
    assert "headers over 8192 bytes" in await error_of(
        await client.get("/healthz", headers=many), 431
    )
    big = orjson.dumps({"users": [{"id": "c" * 100}] * 60})
    message = await error_of(await client.post(batch, data=big, headers=bearer(ACME_KEY)), 413)
    assert "body over 4096 bytes" in message

    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 1000

    chunked = await client.post(batch, data=chunks(), headers=bearer(BETA_KEY))
    await error_of(chunked, 413)  # no Content-Length: aiohttp's own limit, still JSON
    users = orjson.dumps({"users": [{"id": f"c-{n}"} for n in range(11)]})
    message = await error_of(await client.post(batch, data=users, headers=bearer(BETA_KEY)), 413)
    assert "at most 10 per batch" in message

    # Five at once are fine; the sixth of the same key waits, another key does not.
    path = "/v1/partner/users/c-1/segments"
    key = "rate-test-key"
    for _ in range(5):
        assert (await client.get(path, headers=bearer(key))).status == 401  # unknown, counted
    limited = await client.get(path, headers=bearer(key))
    assert "requests per second" in await error_of(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert (await client.get(path, headers=bearer("another-key"))).status == 401


def test_rate_limiter_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(2.0, 2.0, clock=lambda: now[0])
    assert [limiter.wait_needed("k") for _ in range(3)] == [0.0, 0.0, 0.5]
    now[0] = 0.5
    assert limiter.wait_needed("k") == 0.0
    assert limiter.wait_needed("k") > 0


async def test_keys_guard_admin_and_lookup_endpoints(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: Any,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    s = secured(settings, tmp_path, lookup_auth="key")
    await start_ingest(s)
    await produce(producer, s.kafka.topic, [new_car_view("k-user", d + 1) for d in range(2)])
    await wait_until_offsets(redis_client, s, 2)
    client = await serve(aiohttp_client, s, rules)
    path = "/v1/users/k-user/segments"

    await error_of(await client.get(path), 401)
    await error_of(await client.get(path, headers=bearer("nope")), 401)

    async def segments(key: str) -> list[str]:
        response = await client.get(path, headers=bearer(key))
        assert response.status == 200
        found: list[str] = (await response.json())["segments"]
        return found

    await wait_until_async_equal(lambda: segments(ADMIN_KEY), ALL)
    # A partner sees only what it was granted.
    assert await segments(ACME_KEY) == ["auto_new_car_intent", "new_car_socal"]
    assert await segments(BETA_KEY) == ["geo_socal"]

    body = orjson.dumps({"uid": "k-user"})
    for route in ("/v1/privacy/opt-out", "/v1/privacy/erase", "/v1/privacy/consent"):
        await error_of(await client.post(route, data=body), 401)
        await error_of(await client.post(route, data=body, headers=bearer(ACME_KEY)), 401)
    await error_of(await client.get("/v1/privacy/users/k-user", headers=bearer(BETA_KEY)), 401)
    await error_of(await client.post("/v1/admin/partners/reload", headers=bearer(ACME_KEY)), 401)
    assert (await client.get("/v1/privacy/users/k-user", headers=bearer(ADMIN_KEY))).status == 200
    # Rules and estimates: admin only.
    estimate = "/v1/admin/segments/new_car_socal/estimate"
    await error_of(await client.get(estimate, headers=bearer(ACME_KEY)), 401)
    await error_of(await client.get("/v1/admin/rules", headers=bearer(BETA_KEY)), 401)
    answer = await client.get(estimate, headers=bearer(ADMIN_KEY))
    assert await answer.json() == {"segment": "new_car_socal", "members": 1, "status": "active"}
    rules_doc = await (await client.get("/v1/admin/rules", headers=bearer(ADMIN_KEY))).json()
    assert rules_doc["version"] == rules.version
    unknown = "/v1/admin/segments/nope/estimate"
    await error_of(await client.get(unknown, headers=bearer(ADMIN_KEY)), 404)

    # With no admin key configured, the admin API is off altogether.
    off = replace(s, partner=replace(s.partner, admin_key_sha256=""))
    closed = await serve(aiohttp_client, off, rules)
    message = await error_of(
        await closed.post("/v1/privacy/opt-out", data=body, headers=bearer(ADMIN_KEY)), 403
    )
    assert "admin API disabled" in message


async def test_no_error_body_leaks_internals(
    settings: Settings, rules: CompiledRules, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    s = secured(settings, tmp_path)
    client = await serve(aiohttp_client, s, rules)
    acme, admin = bearer(ACME_KEY), bearer(ADMIN_KEY)
    cases: list[tuple[str, str, Any, dict[str, str], int]] = [
        ("GET", "/nowhere", None, {}, 404),
        ("DELETE", "/v1/users/x/segments", None, {}, 405),
        ("GET", "/v1/users/" + "x" * 200 + "/segments", None, {}, 400),
        ("GET", "/v1/partner/users/x/segments", None, {}, 401),
        ("GET", "/v1/partner/users/x/segments?id_type=email", None, acme, 400),
        ("POST", "/v1/partner/segments/batch", b"{nope", acme, 400),
        ("POST", "/v1/partner/segments/batch", b'{"users": 5}', acme, 400),
        ("POST", "/v1/partner/segments/batch", b'{"users": [{"id": 5}]}', acme, 400),
        ("POST", "/v1/openrtb/enrich", b"[1, 2", acme, 400),
        ("POST", "/v1/openrtb/enrich", b"[]", acme, 400),
        ("POST", "/v1/openrtb/enrich?mode=sideways", b"{}", acme, 400),
        ("POST", "/v1/prebid/rtd", b'{"bidders": [1]}', acme, 400),
        ("POST", "/v1/privacy/opt-out", b"\xff\xfe", admin, 400),
        ("POST", "/v1/privacy/erase", b'{"uid": ""}', admin, 400),
        ("POST", "/v1/privacy/erase", b'{"uid": ["a"]}', admin, 400),
        ("GET", "/v1/sync/nobody/setuid?uid=1", None, {}, 404),
    ]
    for method, path, body, headers, status in cases:
        response = await client.request(method, path, data=body, headers=headers)
        await error_of(response, status)

    # A partner file that is refused names the file, not the server's folders.
    (tmp_path / "partners.yaml").write_text(partner_yaml().replace("segtax: 600", "segtax: 3"))
    refused = await client.post("/v1/admin/partners/reload", headers=admin)
    assert refused.status == 422
    assert str(tmp_path) not in await refused.text()

    # Redis gone: the admin API says so, without the why.
    (tmp_path / "partners.yaml").write_text(partner_yaml())
    gone = replace(s, redis=replace(s.redis, url="redis://127.0.0.1:1/0"))
    down = await aiohttp_client(create_lookup_app(gone, rules), server_kwargs=dict(PARSER_LIMITS))
    response = await down.post("/v1/privacy/opt-out", data=b'{"uid": "u"}', headers=admin)
    assert "store unavailable" in await error_of(response, 503)
    # ... and lookups keep answering (fail closed: this replica never loaded anything).
    assert (await down.get("/v1/users/u/segments")).status == 200


async def test_oversized_header_line_is_refused_plainly(
    settings: Settings, rules: CompiledRules, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A single header line past the HTTP parser's limit gets the parser's 400: no JSON, but
    no internals either (docs/security.md)."""
    client = await serve(aiohttp_client, secured(settings, tmp_path), rules)
    url = str(client.make_url("/healthz"))
    async with (
        ClientSession() as session,
        session.get(url, headers={"X-Huge": "y" * 70_000}) as response,
    ):
        assert response.status in (400, 431)
        assert not LEAKS.search(await response.text())


async def wait_until_async_equal(get: Any, wanted: object, timeout: float = 10) -> None:
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while (got := await get()) != wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"got {got}, wanted {wanted}")
        await asyncio.sleep(0.05)
