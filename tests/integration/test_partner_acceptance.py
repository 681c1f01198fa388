"""Issue 5's acceptance on the real stack: Kafka -> IngestService -> Redis -> lookup app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, BETA_KEY
from tests.bidder_adapter.stack import bearer, ready_partner_app, wait_matched, with_partners
from tests.integration.conftest import StartIngest
from tests.integration.helpers import new_car_view, produce

ACME_BOTH = [{"id": "acme-new-vehicles"}, {"id": "acme-socal-dealers"}]


async def test_sync_round_trip_then_enrich_by_buyeruid(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    await start_ingest()
    client, app = await ready_partner_app(aiohttp_client, with_partners(settings, tmp_path), rules)

    # 1. Our pixel fires in the browser: we mint our cookie and send the browser to acme.
    ours = await client.get("/v1/sync/acme-dsp/redirect?gdpr=0", allow_redirects=False)
    assert ours.status == 302
    cookie_id = ours.cookies["dmp_uid"].value
    to_acme = urlsplit(ours.headers["Location"])
    assert to_acme.netloc == "sync.acme.example"
    assert parse_qs(to_acme.query)["dmp"] == [cookie_id]
    # 2. acme reads its own cookie and redirects back to our match pixel with its id.
    back = await client.get(
        "/v1/sync/acme-dsp/setuid?uid=ACME-77&gdpr=0", headers={"Cookie": f"dmp_uid={cookie_id}"}
    )
    assert back.status == 200
    assert back.cookies["dmp_uid"].value == cookie_id
    assert await wait_matched(app, "acme-dsp", "ACME-77") == cookie_id

    # 3. The same browser browses: events keyed by our cookie id go through Kafka and ingest.
    await produce(
        producer, settings.kafka.topic, [new_car_view(cookie_id, 3), new_car_view(cookie_id, 1)]
    )

    # 4. acme's bidder enriches a bid request that only carries its own buyeruid.
    request = {"id": "bid-1", "tmax": 120, "imp": [{"id": "1"}], "user": {"buyeruid": "ACME-77"}}
    raw = orjson.dumps(request)
    answers: list[Any] = []

    async def enriched() -> bool:
        response = await client.post("/v1/openrtb/enrich", data=raw, headers=bearer(ACME_KEY))
        answers.append(await response.json())
        return response.headers["X-Dmp-Outcome"] == "enriched"

    await wait_until_async(enriched, 10)
    assert answers[-1] == {
        **request,
        "user": {
            "buyeruid": "ACME-77",
            "data": [
                {
                    "id": "dmp.example",
                    "name": "Example DMP",
                    "segment": ACME_BOTH,
                    "ext": {"segtax": 600},
                }
            ],
        },
    }
    internal = await client.get(f"/v1/users/{cookie_id}/segments")
    assert (await internal.json())["segments"] == [
        "auto_new_car_intent",
        "geo_socal",
        "new_car_socal",
    ]


async def test_two_partners_see_their_own_views_of_one_real_user(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    await start_ingest()
    client, _ = await ready_partner_app(aiohttp_client, with_partners(settings, tmp_path), rules)
    uid = "real-user-1"
    await produce(producer, settings.kafka.topic, [new_car_view(uid, 2), new_car_view(uid, 1)])
    path = f"/v1/partner/users/{uid}/segments"

    async def both_known() -> bool:
        beta = await (await client.get(path, headers=bearer(BETA_KEY))).json()
        acme = await (await client.get(path, headers=bearer(ACME_KEY))).json()
        return bool(
            beta["segments"] == ["56"] and acme["data"] and acme["data"][0]["segment"] == ACME_BOTH
        )

    await wait_until_async(both_known, 10)
    acme = await (await client.get(path, headers=bearer(ACME_KEY))).json()
    beta = await (await client.get(path, headers={"X-Api-Key": BETA_KEY})).json()
    assert acme["data"][0]["segment"] == ACME_BOTH
    assert acme["data"][0]["ext"] == {"segtax": 600}
    assert beta == {"id": uid, "segments": ["56"], "segtax": 4}
    # Each key reads only its own view: no id of one partner appears in the other's answer.
    assert "56" not in orjson.dumps(acme).decode()
    assert "acme" not in orjson.dumps(beta).decode()
    unknown = await client.get(path, headers=bearer(ACME_KEY + "x"))
    assert unknown.status == 401


async def wait_until_async(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """wait_until for an async predicate (here: an HTTP call)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        await asyncio.sleep(0.02)
