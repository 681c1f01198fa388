"""ID sync on the real app and Redis: both directions, consent, TTL, our cookie, replicas."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from bidder_adapter.app_keys import MATCH_TABLE
from bidder_adapter.sync import PIXEL_GIF
from dmp.config import Settings
from dmp.lookup import create_lookup_app
from dmp.match_table import MatchKeys
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY
from tests.bidder_adapter.stack import (
    bearer,
    ready_partner_app,
    seed_app,
    wait_matched,
    with_partners,
)
from tests.bidder_adapter.test_openrtb_read import TCF_CORE
from tests.integration.conftest import wait_until
from tests.integration.tcf_encoder import encode_gpp

Client = TestClient[Any, Any]
# A GPP string whose EU TCF v2 section consents to our purposes.
GPP = encode_gpp({2: TCF_CORE})
DAY = 86400


@pytest.fixture
async def served(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> tuple[Client, web.Application]:
    return await ready_partner_app(aiohttp_client, with_partners(settings, tmp_path), rules)


async def setuid(client: Client, query: str, cookie: str | None = None) -> Any:
    headers = {"Cookie": f"dmp_uid={cookie}"} if cookie else {}
    return await client.get(f"/v1/sync/acme-dsp/setuid?{query}", headers=headers)


async def test_partner_initiated_sync_stores_and_sets_our_cookie(
    served: tuple[Client, web.Application], redis_client: aioredis.Redis, settings: Settings
) -> None:
    client, app = served
    response = await setuid(client, "uid=acme-user-1")
    assert response.status == 200
    assert response.content_type == "image/gif"
    assert await response.read() == PIXEL_GIF
    morsel = response.cookies["dmp_uid"]
    cookie_id = morsel.value
    assert len(cookie_id) == 22
    assert morsel["max-age"] == str(390 * DAY)
    assert morsel["secure"]
    assert morsel["httponly"]
    assert morsel["samesite"] == "None"
    assert morsel["path"] == "/"

    keys = MatchKeys(settings.redis.key_prefix, "acme-dsp")
    raw = await redis_client.get(keys.forward("acme-user-1"))
    assert raw is not None
    assert orjson.loads(raw)[0] == cookie_id
    assert 30 * DAY - 60 < await redis_client.ttl(keys.forward("acme-user-1")) <= 30 * DAY
    assert await redis_client.get(keys.reverse(cookie_id)) == b"acme-user-1"
    assert await wait_matched(app, "acme-dsp", "acme-user-1") == cookie_id

    # A browser that already has our cookie keeps its id.
    again = await setuid(client, "uid=acme-user-2", cookie=cookie_id)
    assert again.cookies["dmp_uid"].value == cookie_id
    assert await wait_matched(app, "acme-dsp", "acme-user-2") == cookie_id


async def test_sync_then_enrich_by_buyeruid(served: tuple[Client, web.Application]) -> None:
    client, app = served
    response = await setuid(client, "uid=acme-buyer-9&gdpr=0")
    cookie_id = response.cookies["dmp_uid"].value
    seed_app(app, cookie_id, "auto_new_car_intent")
    await wait_matched(app, "acme-dsp", "acme-buyer-9")
    request = {"id": "r", "user": {"buyeruid": "acme-buyer-9"}}
    enriched = await client.post(
        "/v1/openrtb/enrich", data=orjson.dumps(request), headers=bearer(ACME_KEY)
    )
    assert enriched.headers["X-Dmp-Outcome"] == "enriched"
    doc = await enriched.json()
    assert doc["user"]["buyeruid"] == "acme-buyer-9"
    assert doc["user"]["data"][0]["segment"] == [{"id": "acme-new-vehicles"}]
    lookup = await client.get(
        "/v1/partner/users/acme-buyer-9/segments?id_type=buyeruid", headers=bearer(ACME_KEY)
    )
    assert (await lookup.json())["data"][0]["segment"] == [{"id": "acme-new-vehicles"}]


@pytest.mark.parametrize(
    "query",
    [
        "gdpr=1",
        "gdpr=1&gdpr_consent=",
        "gdpr=1&gdpr_consent=not-a-tc-string",
        "gdpr=yes",
        "gpp_sid=2",
        "gpp_sid=7,2&gpp=garbage",
        "gpp_sid=two",
    ],
)
async def test_no_consent_means_204_and_nothing_read_set_or_stored(
    served: tuple[Client, web.Application],
    redis_client: aioredis.Redis,
    settings: Settings,
    query: str,
) -> None:
    client, _ = served
    for path in (
        f"/v1/sync/acme-dsp/setuid?uid=eu-user&{query}",
        f"/v1/sync/acme-dsp/redirect?{query}",
    ):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 204, path
        assert "Set-Cookie" not in response.headers
        assert "Location" not in response.headers
    keys = MatchKeys(settings.redis.key_prefix, "acme-dsp")
    assert await redis_client.exists(keys.forward("eu-user"), keys.changes) == 0


@pytest.mark.parametrize(
    "query",
    [f"gdpr=1&gdpr_consent={TCF_CORE}", f"gpp_sid=2&gpp={GPP}", "gpp_sid=7&gpp=x", "gdpr=0"],
)
async def test_consent_or_no_gdpr_lets_the_sync_through(
    served: tuple[Client, web.Application], query: str
) -> None:
    client, app = served
    response = await setuid(client, f"uid=ok-user&{query}")
    assert response.status == 200
    await wait_matched(app, "acme-dsp", "ok-user")


async def test_ours_redirects_with_the_uid_macro_filled(
    served: tuple[Client, web.Application],
) -> None:
    client, _ = served
    response = await client.get("/v1/sync/acme-dsp/redirect", allow_redirects=False)
    assert response.status == 302
    cookie_id = response.cookies["dmp_uid"].value
    assert response.headers["Location"] == (
        f"https://sync.acme.example/match?dmp={cookie_id}&gdpr=&gdpr_consent="
    )
    known = "cookie.with~safe-chars"
    response = await client.get(
        f"/v1/sync/acme-dsp/redirect?gdpr=1&gdpr_consent={TCF_CORE}",
        headers={"Cookie": f"dmp_uid={known}"},
        allow_redirects=False,
    )
    target = urlsplit(response.headers["Location"])
    assert (target.scheme, target.netloc, target.path) == ("https", "sync.acme.example", "/match")
    assert parse_qs(target.query) == {"dmp": [known], "gdpr": ["1"], "gdpr_consent": [TCF_CORE]}
    assert response.cookies["dmp_uid"].value == known  # refreshed, same id


async def test_sync_refuses_what_it_cannot_do(served: tuple[Client, web.Application]) -> None:
    client, _ = served
    cases = [
        ("/v1/sync/beta-ssp/setuid?uid=x", 404),  # beta does not send buyeruid
        ("/v1/sync/beta-ssp/redirect", 404),  # beta has no sync_url
        ("/v1/sync/nobody/setuid?uid=x", 404),
        ("/v1/sync/acme-dsp/setuid", 400),
        (f"/v1/sync/acme-dsp/setuid?uid={'x' * 257}", 400),
    ]
    for path, status in cases:
        response = await client.get(path, allow_redirects=False)
        assert response.status == status, path
    # A cookie value we would not have minted is replaced, not trusted.
    response = await setuid(client, "uid=fresh", cookie="bad%20value")
    assert response.cookies["dmp_uid"].value != "bad%20value"


async def test_resync_moves_the_partner_id_and_replicas_follow(
    aiohttp_client: AiohttpClient,
    served: tuple[Client, web.Application],
    redis_client: aioredis.Redis,
    settings: Settings,
    rules: CompiledRules,
    tmp_path: Path,
) -> None:
    client, app = served
    await setuid(client, "uid=moving", cookie="cookie-a")
    await setuid(client, "uid=moving", cookie="cookie-b")
    keys = MatchKeys(settings.redis.key_prefix, "acme-dsp")
    assert await redis_client.get(keys.reverse("cookie-a")) is None
    assert await redis_client.get(keys.reverse("cookie-b")) == b"moving"

    await wait_until(
        lambda: app[MATCH_TABLE].resolve("acme-dsp", "moving", time.time()) == "cookie-b",
        5,
        "the move to cookie-b",
    )
    # A replica started later loads the table from Redis before it is ready.
    (tmp_path / "other").mkdir()
    other = create_lookup_app(with_partners(settings, tmp_path / "other"), rules)
    await aiohttp_client(other)
    assert await wait_matched(other, "acme-dsp", "moving") == "cookie-b"


async def test_match_ttl_is_configurable_within_14_to_60_days(
    aiohttp_client: AiohttpClient,
    settings: Settings,
    rules: CompiledRules,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    s = with_partners(settings, tmp_path)
    short = replace(s, partner=replace(s.partner, match_ttl_days=14))
    client, _ = await ready_partner_app(aiohttp_client, short, rules)
    await setuid(client, "uid=short-lived")
    ttl = await redis_client.ttl(MatchKeys(s.redis.key_prefix, "acme-dsp").forward("short-lived"))
    assert 14 * DAY - 60 < ttl <= 14 * DAY
    for days in (13, 61):
        with pytest.raises(ValueError, match="14 to 60 days"):
            create_lookup_app(replace(s, partner=replace(s.partner, match_ttl_days=days)), rules)
