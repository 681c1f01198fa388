"""Helpers for tests of the partner endpoints on a real lookup app (real Redis)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from bidder_adapter.app_keys import MATCH_TABLE
from bidder_adapter.profiles import hash_api_key
from dmp.config import Settings
from dmp.ids import uid_hash
from dmp.lookup import REPLICA, create_lookup_app
from dmp.replica import Replica
from segment_rules import CompiledRules
from tests.bidder_adapter.partner_yaml import ADMIN_KEY, partner_yaml, write_partners
from tests.integration.conftest import wait_lookup_ready, wait_until

_positions = itertools.count(1_000_000)


def with_partners(settings: Settings, folder: Path, text: str | None = None) -> Settings:
    path = write_partners(folder / "partners.yaml", text or partner_yaml())
    return replace(
        settings,
        partners_path=path,
        partner=replace(
            settings.partner, admin_key_sha256=hash_api_key(ADMIN_KEY), reload_poll_seconds=0.05
        ),
    )


async def ready_partner_app(
    aiohttp_client: AiohttpClient, settings: Settings, rules: CompiledRules
) -> tuple[TestClient[Any, Any], web.Application]:
    app = create_lookup_app(settings, rules)
    client = await aiohttp_client(app)
    await wait_lookup_ready(app)
    return client, app


def seed(replica: Replica, uid: str, *segments: str) -> None:
    """Put a cookie in base segments straight into the replica (no ingest needed)."""
    position = next(_positions)
    replica.add_ids([(position, uid_hash(uid))])
    for segment in segments:
        replica.add(segment, [position])


def seed_app(app: web.Application, uid: str, *segments: str) -> None:
    seed(app[REPLICA], uid, *segments)


async def wait_matched(app: web.Application, partner_id: str, partner_uid: str) -> str:
    table = app[MATCH_TABLE]
    found: list[str] = []

    def matched() -> bool:
        cookie = table.resolve(partner_id, partner_uid, 0.0)
        if cookie is not None:
            found.append(cookie)
        return cookie is not None

    await wait_until(matched, 5, f"match of {partner_id}/{partner_uid}")
    return found[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
