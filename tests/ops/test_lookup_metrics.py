"""Lookup request metrics: route, status and partner labels; answers emptied by a deadline."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.lookup import METRICS, ROUTES, create_lookup_app
from dmp.metrics import PARTNER_LABEL
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, partner_yaml
from tests.ops.test_logs import free_port
from tests.ops.test_service_metrics import value

SEGMENTS = "/v1/users/{uid}/segments"


async def test_requests_are_timed_by_route_status_and_partner(
    tmp_path: Path, rules: CompiledRules, aiohttp_client: AiohttpClient
) -> None:
    partners = tmp_path / "partners.yaml"
    partners.write_text(partner_yaml())
    settings = Settings.from_env(
        {
            "DMP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # replica stays empty
            "DMP_PARTNERS_PATH": str(partners),
            "DMP_PARTNER_MIN_TMAX_MS": "10",
        }
    )

    async def answered_for_a_partner(request: web.Request) -> web.Response:
        request[PARTNER_LABEL] = "test-partner"
        return web.json_response({}, headers={"X-Dmp-Outcome": "tmax"})

    app = create_lookup_app(settings, rules)
    app[ROUTES].add_get("/test/partner", answered_for_a_partner)
    client = await aiohttp_client(app)
    metrics = app[METRICS]

    assert (await client.get("/v1/users/someone/segments")).status == 200
    assert (await client.get("/v1/users/" + "x" * 200 + "/segments")).status == 400
    assert (await client.get("/no/such/route")).status == 404

    def count(endpoint: str, status: str, partner: str = "none") -> float | None:
        return value(
            metrics,
            "dmp_lookup_request_duration_seconds_count",
            endpoint=endpoint,
            partner=partner,
            status=status,
        )

    assert count(SEGMENTS, "200") == 1
    assert count(SEGMENTS, "400") == 1
    assert count("unmatched", "404") == 1  # unknown paths do not mint label values
    assert value(metrics, "dmp_lookup_requests_in_flight") == 0

    # A bid request whose tmax leaves no time is answered at once, unenriched: counted.
    bid_request = {"id": "r1", "imp": [{"id": "1"}], "tmax": 5, "user": {"buyeruid": "b-1"}}
    response = await client.post(
        "/v1/openrtb/enrich",
        data=orjson.dumps(bid_request),
        headers={"Authorization": f"Bearer {ACME_KEY}", "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert response.headers["X-Dmp-Outcome"] == "tmax"
    body = metrics.render().decode()
    deadline_lines = [
        line
        for line in body.splitlines()
        if line.startswith("dmp_lookup_deadline_empty_answers_total{")
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in deadline_lines) == 1

    # A handler that authenticated a partner labels the request with it.
    assert (await client.get("/test/partner")).status == 200
    assert count("/test/partner", "200", partner="test-partner") == 1
    assert value(metrics, "dmp_lookup_deadline_empty_answers_total", partner="test-partner") == 1
