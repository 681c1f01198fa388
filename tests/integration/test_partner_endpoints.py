"""The partner endpoints on a real lookup app: auth, views, batch, enrich, RTD, admin, OpenAPI."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from pytest_aiohttp import AiohttpClient
from redis.exceptions import ConnectionError as RedisConnectionError

from bidder_adapter.app_keys import MATCH_FOLLOWER, PARTNERS
from dmp.config import Settings
from dmp.lookup import ROUTES
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import (
    ACME_KEY,
    ADMIN_KEY,
    BETA_KEY,
    partner_yaml,
    write_partners,
)
from tests.bidder_adapter.stack import bearer, ready_partner_app, seed_app, with_partners
from tests.bidder_adapter.test_openrtb_read import TCF_CORE
from tests.integration.conftest import wait_until

Client = TestClient[Any, Any]
USER = "cookie-both-views"
ACME_DATA = {
    "id": "dmp.example",
    "name": "Example DMP",
    "segment": [{"id": "acme-new-vehicles"}, {"id": "acme-socal-dealers"}],
    "ext": {"segtax": 600},
}


@pytest.fixture
async def served(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> tuple[Client, web.Application]:
    client, app = await ready_partner_app(aiohttp_client, with_partners(settings, tmp_path), rules)
    # In both base segments, so in the composite new_car_socal too.
    seed_app(app, USER, "auto_new_car_intent", "geo_socal")
    seed_app(app, "cookie-geo-only", "geo_socal")
    return client, app


async def get_json(client: Client, path: str, key: str | None, status: int = 200) -> Any:
    response = await client.get(path, headers=bearer(key) if key else {})
    assert response.status == status, await response.text()
    return await response.json()


async def test_partner_key_is_required(served: tuple[Client, web.Application]) -> None:
    client, _ = served
    path = f"/v1/partner/users/{USER}/segments"
    for headers in ({}, bearer("nope"), {"X-Api-Key": "nope"}, {"Authorization": "Basic abc"}):
        response = await client.get(path, headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="dmp"'
    response = await client.get(path, headers={"X-Api-Key": BETA_KEY})
    assert response.status == 200


async def test_two_partners_see_different_correct_views_of_one_user(
    served: tuple[Client, web.Application],
) -> None:
    client, _ = served
    path = f"/v1/partner/users/{USER}/segments"
    assert await get_json(client, f"/v1/users/{USER}/segments", None) == {
        "uid": USER,
        "segments": ["auto_new_car_intent", "geo_socal", "new_car_socal"],
    }
    assert await get_json(client, path, ACME_KEY) == {"id": USER, "data": [ACME_DATA]}
    assert await get_json(client, path, BETA_KEY) == {"id": USER, "segments": ["56"], "segtax": 4}
    # acme is granted nothing this cookie has; beta still sees geo.
    geo = "/v1/partner/users/cookie-geo-only/segments"
    assert await get_json(client, geo, ACME_KEY) == {"id": "cookie-geo-only", "data": []}
    assert (await get_json(client, geo, BETA_KEY))["segments"] == ["56"]


async def test_a_key_cannot_read_another_partners_view(
    served: tuple[Client, web.Application],
) -> None:
    client, _ = served
    # Whatever else the request names, the key alone decides whose view answers.
    response = await client.get(
        f"/v1/partner/users/{USER}/segments?partner=acme-dsp&partner_id=acme-dsp",
        headers={**bearer(BETA_KEY), "X-Partner-Id": "acme-dsp"},
    )
    assert await response.json() == {"id": USER, "segments": ["56"], "segtax": 4}
    body = orjson.dumps({"ortb2": {"user": {"id": USER}}, "bidders": ["beta"]})
    rtd = await client.post("/v1/prebid/rtd", data=body, headers=bearer(ACME_KEY))
    assert "acme-new-vehicles" in await rtd.text()
    # acme's key does not open the admin API, and beta may not use acme's id type.
    assert (await client.post("/v1/admin/partners/reload", headers=bearer(ACME_KEY))).status == 401
    buyer = await client.get(
        f"/v1/partner/users/{USER}/segments?id_type=buyeruid", headers=bearer(BETA_KEY)
    )
    assert buyer.status == 403


async def test_batch_answers_in_order_and_checks_input(
    served: tuple[Client, web.Application],
) -> None:
    client, _ = served
    users = [{"id": USER}, {"id": "never-seen"}, {"id": "cookie-geo-only", "id_type": "cookie"}]
    response = await client.post(
        "/v1/partner/segments/batch", json={"users": users}, headers=bearer(BETA_KEY)
    )
    assert response.status == 200
    assert await response.json() == {
        "users": [
            {"id": USER, "segments": ["56"], "segtax": 4, "id_type": "cookie"},
            {"id": "never-seen", "segments": [], "segtax": 4, "id_type": "cookie"},
            {"id": "cookie-geo-only", "segments": ["56"], "segtax": 4, "id_type": "cookie"},
        ]
    }
    too_many = {"users": [{"id": f"u{i}"} for i in range(1001)]}
    for body, status in (
        (too_many, 413),
        ({"users": "x"}, 400),
        ({"users": [{"id": 5}]}, 400),
        ({"users": [{"id": "a", "id_type": "email"}]}, 400),
        ({"users": [{"id": "a", "id_type": "buyeruid"}]}, 403),
    ):
        response = await client.post(
            "/v1/partner/segments/batch", json=body, headers=bearer(BETA_KEY)
        )
        assert response.status == status, body


async def test_enrich_full_fragment_and_outcomes(served: tuple[Client, web.Application]) -> None:
    client, _ = served
    request = {"id": "r1", "tmax": 80, "user": {"id": USER}, "imp": [{"id": "1", "bidfloor": 0.5}]}
    raw = orjson.dumps(request)
    response = await client.post("/v1/openrtb/enrich", data=raw, headers=bearer(ACME_KEY))
    assert response.headers["X-Dmp-Outcome"] == "enriched"
    assert await response.read() == orjson.dumps(
        {**request, "user": {"id": USER, "data": [ACME_DATA]}}
    )
    fragment = await client.post(
        "/v1/openrtb/enrich?mode=fragment", data=raw, headers=bearer(BETA_KEY)
    )
    beta = {
        "id": "dmp.example",
        "name": "Example DMP",
        "segment": [{"id": "56"}],
        "ext": {"segtax": 4},
    }
    assert await fragment.json() == {"user": {"data": [beta]}}

    cases = [
        ({**request, "tmax": 5}, "tmax"),
        ({**request, "regs": {"gdpr": 1}}, "gdpr"),
        ({**request, "regs": {"ext": {"gdpr": 1}}}, "gdpr"),
        ({**request, "user": {"id": "never-seen"}}, "no_segments"),
        ({"id": "r2", "imp": []}, "no_user"),
    ]
    for doc, outcome in cases:
        raw = orjson.dumps(doc)
        for mode, expected in (("full", raw), ("fragment", b"{}")):
            response = await client.post(
                f"/v1/openrtb/enrich?mode={mode}", data=raw, headers=bearer(ACME_KEY)
            )
            assert response.headers["X-Dmp-Outcome"] == outcome
            assert await response.read() == expected
    with_consent = {**request, "regs": {"gdpr": 1}, "user": {"id": USER, "consent": TCF_CORE}}
    response = await client.post(
        "/v1/openrtb/enrich", data=orjson.dumps(with_consent), headers=bearer(ACME_KEY)
    )
    assert response.headers["X-Dmp-Outcome"] == "enriched"
    for bad, status in ((b"{nope", 400), (b"[1]", 400)):
        response = await client.post("/v1/openrtb/enrich", data=bad, headers=bearer(ACME_KEY))
        assert response.status == status
    response = await client.post(
        "/v1/openrtb/enrich?mode=partial", data=raw, headers=bearer(ACME_KEY)
    )
    assert response.status == 400


async def test_enrich_by_eids_in_2_5_and_2_6_places(served: tuple[Client, web.Application]) -> None:
    client, _ = served
    eids = [
        {"source": "other.example", "uids": [{"id": "x"}]},
        {"source": "dmp.example", "uids": [{"id": USER}]},
    ]
    for user in ({"eids": eids}, {"ext": {"eids": eids}}):
        response = await client.post(
            "/v1/openrtb/enrich?mode=fragment",
            data=orjson.dumps({"id": "r", "user": user}),
            headers=bearer(BETA_KEY),
        )
        assert response.headers["X-Dmp-Outcome"] == "enriched", user
        assert (await response.json())["user"]["data"][0]["segment"] == [{"id": "56"}]


async def test_prebid_rtd_answer(served: tuple[Client, web.Application]) -> None:
    client, _ = served
    body = {"ortb2": {"user": {"id": USER}}, "bidders": ["acme", "beta", "unknown"]}
    response = await client.post("/v1/prebid/rtd", json=body, headers=bearer(BETA_KEY))
    beta = {"user": {"data": [{**ACME_DATA, "segment": [{"id": "56"}], "ext": {"segtax": 4}}]}}
    assert await response.json() == {
        "ortb2Fragments": {
            "global": beta,
            "bidder": {"acme": {"user": {"data": [ACME_DATA]}}, "beta": beta},
        }
    }
    # Our first-party cookie identifies the user when the browser sends it.
    response = await client.post(
        "/v1/prebid/rtd",
        json={"bidders": ["acme"]},
        headers={**bearer(BETA_KEY), "Cookie": f"dmp_uid={USER}"},
    )
    assert (await response.json())["ortb2Fragments"]["bidder"] == {
        "acme": {"user": {"data": [ACME_DATA]}}
    }
    gdpr = {"ortb2": {"user": {"id": USER}, "regs": {"gdpr": 1}}, "bidders": ["acme"]}
    response = await client.post("/v1/prebid/rtd", json=gdpr, headers=bearer(BETA_KEY))
    assert await response.json() == {"ortb2Fragments": {"global": {}, "bidder": {}}}


async def test_admin_reload(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> None:
    s = with_partners(settings, tmp_path)
    # No file polling here: the admin call must be what installs the new version.
    s = replace(s, partner=replace(s.partner, reload_poll_seconds=3600.0))
    client, app = await ready_partner_app(aiohttp_client, s, rules)
    seed_app(app, USER, "auto_new_car_intent", "geo_socal")
    path = "/v1/admin/partners/reload"
    assert (await client.post(path)).status == 401
    assert (await client.post(path, headers=bearer("wrong"))).status == 401
    same = await client.post(path, headers=bearer(ADMIN_KEY))
    assert (await same.json())["changed"] is False

    partners_path = app[PARTNERS].path
    assert partners_path is not None
    write_partners(partners_path, partner_yaml(acme_map="acme-v2"))
    changed = await client.post(path, headers=bearer(ADMIN_KEY))
    doc = await changed.json()
    assert doc["changed"] is True
    assert doc["partners"] == 2
    answer = await get_json(client, f"/v1/partner/users/{USER}/segments", ACME_KEY)
    assert answer["data"][0]["segment"][0] == {"id": "acme-v2"}

    write_partners(partners_path, partner_yaml().replace("segtax: 600", "segtax: 3"))
    refused = await client.post(path, headers=bearer(ADMIN_KEY))
    assert refused.status == 422
    doc = await refused.json()
    assert doc["version"] == app[PARTNERS].current.short_version
    assert doc["errors"][0].startswith(f"{partners_path.name}:")  # no server folders
    assert "partners[0].segtax: must be 4 or >= 500, got 3" in doc["errors"][0]
    answer = await get_json(client, f"/v1/partner/users/{USER}/segments", ACME_KEY)
    assert answer["data"][0]["segment"][0] == {"id": "acme-v2"}  # the last good version


async def test_admin_reload_disabled_without_a_key(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> None:
    s = with_partners(settings, tmp_path)
    s = replace(s, partner=replace(s.partner, admin_key_sha256=""))
    client, _ = await ready_partner_app(aiohttp_client, s, rules)
    response = await client.post("/v1/admin/partners/reload", headers=bearer(ADMIN_KEY))
    assert response.status == 403


async def test_no_request_sees_half_a_version(served: tuple[Client, web.Application]) -> None:
    """Versions differ in both the key's grants and the mapping; each answer must match the
    version it names, while the file flips between them under load."""
    client, app = served
    partners_path = app[PARTNERS].path
    assert partners_path is not None
    texts = {
        "a": partner_yaml(acme_map="map-a"),
        "b": partner_yaml(acme_map="map-b")
        .replace(
            "granted_segments: [auto_new_car_intent, new_car_socal]",
            "granted_segments: [auto_new_car_intent]",
        )
        .replace("      new_car_socal: acme-socal-dealers\n", ""),
    }
    expected: dict[str, list[dict[str, str]]] = {}
    for name, text in texts.items():
        write_partners(partners_path, text)
        assert app[PARTNERS].reload().ok
        expected[app[PARTNERS].current.short_version] = (
            [{"id": "map-a"}, {"id": "acme-socal-dealers"}] if name == "a" else [{"id": "map-b"}]
        )
    stop = asyncio.Event()

    async def flip() -> None:
        n = 0
        while not stop.is_set():
            write_partners(partners_path, texts["ab"[n % 2]])
            app[PARTNERS].reload()
            n += 1
            # Irregular pauses, so flips do not fall into step with the requests.
            await asyncio.sleep(random.random() / 1000)

    body = orjson.dumps({"id": "r", "user": {"id": USER}})

    async def ask() -> tuple[str, Any]:
        # enrich reads the body after authenticating: a real await inside the request.
        response = await client.post(
            "/v1/openrtb/enrich?mode=fragment", data=body, headers=bearer(ACME_KEY)
        )
        return response.headers["X-Partner-Config-Version"], await response.json()

    flipper = asyncio.create_task(flip())
    answers: list[tuple[str, Any]] = []
    try:
        # Rounds of concurrent requests until both versions have answered (or 40 rounds).
        for _ in range(40):
            answers += await asyncio.gather(*(ask() for _ in range(25)))
            if {version for version, _ in answers} == set(expected):
                break
    finally:
        stop.set()
        await flipper
    assert {version for version, _ in answers} == set(expected)
    for version, doc in answers:
        assert doc["user"]["data"][0]["segment"] == expected[version]


async def test_openapi_document_is_valid_and_covers_every_route(
    served: tuple[Client, web.Application],
) -> None:
    client, app = served
    doc = await get_json(client, "/openapi.json", None)
    validate(doc)
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource not in (None, app[ROUTES].catch_all) and route.method != "HEAD"
    }
    assert routes - documented == set()
    assert documented - routes == set()


async def test_readyz_is_degraded_while_the_match_table_cannot_be_followed(
    served: tuple[Client, web.Application], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the match table, buyeruids stop resolving: the replica must say so, as it
    # does when its own change streams cannot be followed.
    client, app = served
    follower = app[MATCH_FOLLOWER]
    assert (await client.get("/readyz")).status == 200

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("match table's Redis is unreachable")

    # Its two reads: partner discovery (every second) and the streams of known partners.
    monkeypatch.setattr(follower.client, "smembers", unreachable)
    monkeypatch.setattr(follower.client, "xread", unreachable)
    await wait_until(lambda: not follower.healthy, 10, "the follower to see the failure")
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["status"] == "degraded"

    monkeypatch.undo()
    await wait_until(lambda: follower.healthy, 15, "the follower to recover")
    assert (await client.get("/readyz")).status == 200
