"""Every shared OpenRTB request, enriched through the HTTP endpoint of a real lookup app.

The user is found the way each document allows: user.id as our cookie id, buyeruid through
a real sync, or (no id at all) our cookie id passed by the caller.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY
from tests.bidder_adapter.stack import (
    bearer,
    ready_partner_app,
    seed_app,
    wait_matched,
    with_partners,
)
from tests.bidder_adapter.support import fixture_id, fixture_paths, request_bytes, strip_ours

OURS = {
    "id": "dmp.example",
    "name": "Example DMP",
    "segment": [{"id": "acme-new-vehicles"}],
    "ext": {"segtax": 600},
}


async def test_every_shared_request_is_enriched_over_http(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules, tmp_path: Path
) -> None:
    client, app = await ready_partner_app(aiohttp_client, with_partners(settings, tmp_path), rules)
    paths = fixture_paths()
    assert len(paths) == 16
    how: dict[str, str] = {}
    for index, path in enumerate(paths):
        raw = request_bytes(path)
        original = orjson.loads(raw)
        user = original.get("user", {})
        query = ""
        if isinstance(user.get("id"), str):
            seed_app(app, user["id"], "auto_new_car_intent")
            how[fixture_id(path)] = "user.id"
        elif isinstance(user.get("buyeruid"), str):
            synced = await client.get(f"/v1/sync/acme-dsp/setuid?uid={user['buyeruid']}")
            cookie_id = synced.cookies["dmp_uid"].value
            seed_app(app, cookie_id, "auto_new_car_intent")
            await wait_matched(app, "acme-dsp", user["buyeruid"])
            how[fixture_id(path)] = "buyeruid"
        else:
            seed_app(app, f"fixture-cookie-{index}", "auto_new_car_intent")
            query = f"&uid=fixture-cookie-{index}"
            how[fixture_id(path)] = "uid"

        response = await client.post(
            f"/v1/openrtb/enrich?mode=full{query}", data=raw, headers=bearer(ACME_KEY)
        )
        assert response.status == 200, fixture_id(path)
        assert response.headers["X-Dmp-Outcome"] == "enriched", fixture_id(path)
        enriched = orjson.loads(await response.read())
        ours = enriched["user"]["data"][-1]
        assert type(ours["ext"]["segtax"]) is int
        stripped = strip_ours(enriched, original, OURS)
        assert stripped == original, fixture_id(path)
        assert orjson.dumps(stripped) == orjson.dumps(original), fixture_id(path)

        fragment = await client.post(
            f"/v1/openrtb/enrich?mode=fragment{query}", data=raw, headers=bearer(ACME_KEY)
        )
        assert await fragment.json() == {"user": {"data": [OURS]}}, fixture_id(path)
    assert set(how.values()) == {"user.id", "buyeruid", "uid"}
