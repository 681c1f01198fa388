"""Embedded mode on the real stack: the bidder's own replica follows Kafka -> ingest -> Redis
and answers in-process, the same as the HTTP endpoint does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from bidder_adapter.embedded import EmbeddedDmp
from bidder_adapter.partner_file import parse_partner_bytes
from dmp.config import Settings
from dmp.match_table import MatchTableStore
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ACME_KEY, partner_yaml
from tests.bidder_adapter.stack import bearer, ready_partner_app, with_partners
from tests.conftest import EXAMPLE_RULES
from tests.integration.conftest import StartIngest, wait_until
from tests.integration.helpers import new_car_view, produce

ACME = parse_partner_bytes(partner_yaml().encode(), "p.yaml").profiles["acme-dsp"]
BOTH = [{"id": "acme-new-vehicles"}, {"id": "acme-socal-dealers"}]


async def test_embedded_replica_answers_in_process_like_the_endpoint(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    await start_ingest()
    async with EmbeddedDmp(settings, rules, ACME, min_tmax_ms=10) as dmp:
        async with asyncio.timeout(10):
            await dmp.wait_ready()
        assert dmp.ready
        request = {"id": "r", "tmax": 50, "user": {"id": "emb-user"}}
        assert dmp.enrich(request) == {}  # not seen yet

        await produce(
            producer,
            settings.kafka.topic,
            [new_car_view("emb-user", 2), new_car_view("emb-user", 1)],
        )
        await wait_until(lambda: dmp.enrich(request) != {}, 5, "the embedded replica to follow")
        fragment = dmp.enrich(request)
        assert fragment["user"]["data"][0]["segment"] == BOTH
        assert fragment["user"]["data"][0]["ext"] == {"segtax": 600}
        assert dmp.segments("emb-user") == ["acme-new-vehicles", "acme-socal-dealers"]
        assert dmp.enrich({**request, "tmax": 5}) == {}  # no time: nothing added
        assert dmp.enrich({**request, "regs": {"gdpr": 1}}) == {}  # GDPR without consent

        # A sync written to Redis reaches the embedded match table: buyeruid resolves.
        store = MatchTableStore(
            redis_client, prefix=settings.redis.key_prefix, ttl_days=30, stream_maxlen=1000
        )
        await store.record("acme-dsp", "acme-emb-7", "emb-user")
        by_buyer = {"id": "r2", "user": {"buyeruid": "acme-emb-7"}}
        await wait_until(lambda: dmp.enrich(by_buyer) != {}, 5, "the embedded match table")
        assert dmp.segments("acme-emb-7", id_type="buyeruid") == [
            "acme-new-vehicles",
            "acme-socal-dealers",
        ]

        # The HTTP endpoint, built from the same code, gives the same fragment.
        client, _ = await ready_partner_app(
            aiohttp_client, with_partners(settings, tmp_path), rules
        )
        response = await client.post(
            "/v1/openrtb/enrich?mode=fragment", data=orjson.dumps(request), headers=bearer(ACME_KEY)
        )
        assert await response.json() == fragment


async def test_embedded_replica_hides_a_segment_the_applied_version_pauses(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
) -> None:
    """The bidder starts from the file (geo_socal active) while the applied version has it
    paused (built by ingest for a backfill): acme sees intent only, never the composite,
    until a version switches geo on, and then the whole audience at once."""
    text = EXAMPLE_RULES.read_text()
    paused = text.replace("  - id: geo_socal\n", "  - id: geo_socal\n    status: paused\n", 1)
    versions = RuleVersions(redis_client, settings.redis.key_prefix)
    await versions.apply(paused, "geo paused")
    await start_ingest()
    await produce(
        producer, settings.kafka.topic, [new_car_view("emb-p", 2), new_car_view("emb-p", 1)]
    )
    async with EmbeddedDmp(settings, rules, ACME, min_tmax_ms=10) as dmp:
        async with asyncio.timeout(10):
            await dmp.wait_ready()
        await wait_until(lambda: dmp.segments("emb-p") != [], 10, "the user's intent")
        assert dmp.segments("emb-p") == ["acme-new-vehicles"]
        # Built (in slot order, which depends on load order), but not answered.
        assert sorted(dmp.replica.base_segments("emb-p")) == ["auto_new_car_intent", "geo_socal"]

        await versions.apply(text, "geo active")
        await wait_until(lambda: len(dmp.segments("emb-p")) == 2, 5, "the version to apply")
        assert dmp.segments("emb-p") == ["acme-new-vehicles", "acme-socal-dealers"]
