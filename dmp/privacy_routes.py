"""Admin endpoints for a user's rights, on the lookup app (admin key required).

    POST /v1/privacy/opt-out   {"uid": ...}  never segmented again
    POST /v1/privacy/erase     {"uid": ...}  stored data removed; report of what was there
    POST /v1/privacy/consent   {"uid": ...}  new consent recorded: an erasure is lifted
    GET  /v1/privacy/users/{uid}             what is stored and suppressed for the cookie

The replica answering the request blocks the cookie in memory before it answers, so its
next lookup already says "no segment"; other replicas follow the privacy change stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from bidder_adapter.following import following
from dmp.auth import admin_refusal
from dmp.config import Settings
from dmp.events import MAX_UID_LENGTH
from dmp.limits import limit_error
from dmp.observed_routes import RouteAdder
from dmp.privacy import ERASED, OPT_OUT, PrivacyStore
from dmp.privacy_follow import SUPPRESSION, SuppressionFollower, SuppressionList
from dmp.redis_client import REDIS_FAILURES, connect
from dmp.replica import Replica

log = logging.getLogger(__name__)
PRIVACY_SETTINGS = web.AppKey("privacy_settings", Settings)
PRIVACY_STORE = web.AppKey("privacy_store", PrivacyStore)
PRIVACY_FOLLOWER = web.AppKey("privacy_follower", SuppressionFollower)
PRIVACY_REPLICA = web.AppKey("privacy_replica", Replica)


def setup_privacy(
    app: web.Application, routes: RouteAdder, settings: Settings, replica: Replica
) -> None:
    """The suppression list (followed from Redis) and the admin endpoints."""
    app[PRIVACY_SETTINGS] = settings
    app[PRIVACY_REPLICA] = replica
    app[SUPPRESSION] = SuppressionList()
    app.cleanup_ctx.append(_privacy_background)
    routes.add_post("/v1/privacy/opt-out", opt_out)
    routes.add_post("/v1/privacy/erase", erase)
    routes.add_post("/v1/privacy/consent", consent)
    routes.add_get("/v1/privacy/users/{uid}", status)


async def _privacy_background(app: web.Application) -> AsyncIterator[None]:
    settings = app[PRIVACY_SETTINGS]
    client = connect(settings.redis)  # a cluster client when DMP_REDIS_CLUSTER
    try:
        app[PRIVACY_STORE] = PrivacyStore.from_settings(client, settings)
        follower = SuppressionFollower(
            client,
            app[SUPPRESSION],
            prefix=settings.redis.key_prefix,
            block_ms=settings.lookup.follow_block_ms,
        )
        app[PRIVACY_FOLLOWER] = follower
        async with following(follower):
            yield
    finally:
        await client.aclose()


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def _uid_from_body(request: web.Request) -> str | web.Response:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return limit_error(400, 'body: expected {"uid": "<cookie id>"}')
    uid = doc.get("uid") if isinstance(doc, dict) else None
    if not isinstance(uid, str) or not 0 < len(uid) <= MAX_UID_LENGTH:
        return limit_error(400, f"uid: a string of 1 to {MAX_UID_LENGTH} characters")
    return uid


async def _suppress(request: web.Request, kind: str) -> web.Response:
    refused = admin_refusal(request, request.app[PRIVACY_SETTINGS])
    if refused is not None:
        return refused
    uid = await _uid_from_body(request)
    if isinstance(uid, web.Response):
        return uid
    store = request.app[PRIVACY_STORE]
    try:
        stored = await store.report(uid, request.app[PRIVACY_REPLICA].rules)
        entry = await store.suppress(uid, kind)
        matches = await store.forget_matches(uid) if kind == ERASED else []
    except REDIS_FAILURES as exc:
        log.warning("privacy request not stored (%s)", exc)
        return limit_error(503, "store unavailable; nothing changed, try again")
    request.app[SUPPRESSION].add(uid)
    return _json(
        {
            "uid": uid,
            "status": "opted_out" if kind == OPT_OUT else "erased",
            "at": entry.at,
            # What was stored when the request came; ingest removes it within about a second.
            "removed": stored["stored"],
            "match_table_entries_removed": matches,
        }
    )


async def opt_out(request: web.Request) -> web.Response:
    return await _suppress(request, OPT_OUT)


async def erase(request: web.Request) -> web.Response:
    return await _suppress(request, ERASED)


async def consent(request: web.Request) -> web.Response:
    refused = admin_refusal(request, request.app[PRIVACY_SETTINGS])
    if refused is not None:
        return refused
    uid = await _uid_from_body(request)
    if isinstance(uid, web.Response):
        return uid
    try:
        lifted = await request.app[PRIVACY_STORE].lift(uid)
    except REDIS_FAILURES as exc:
        log.warning("consent not stored (%s)", exc)
        return limit_error(503, "store unavailable; nothing changed, try again")
    if lifted:
        request.app[SUPPRESSION].discard(uid)
    return _json({"uid": uid, "lifted": lifted})


async def status(request: web.Request) -> web.Response:
    refused = admin_refusal(request, request.app[PRIVACY_SETTINGS])
    if refused is not None:
        return refused
    uid = request.match_info["uid"]
    if not 0 < len(uid) <= MAX_UID_LENGTH:
        return limit_error(400, f"uid: 1 to {MAX_UID_LENGTH} characters")
    try:
        report = await request.app[PRIVACY_STORE].report(uid, request.app[PRIVACY_REPLICA].rules)
    except REDIS_FAILURES as exc:
        log.warning("privacy status unavailable (%s)", exc)
        return limit_error(503, "store unavailable, try again")
    return _json(report)


def openapi_paths() -> dict[str, Any]:
    """These endpoints in OpenAPI 3.1 (merged into /openapi.json by bidder_adapter.openapi)."""
    error: dict[str, Any] = {
        "description": "Refused; the body says why.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    uid_body: dict[str, Any] = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["uid"],
                    "properties": {"uid": {"type": "string", "minLength": 1, "maxLength": 128}},
                }
            }
        },
    }
    answer: dict[str, Any] = {
        "description": "Done; for opt-out and erase, what was stored for the cookie.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    errors: dict[str, Any] = {str(code): error for code in (400, 401, 403, 413, 429, 503)}

    def post(summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"bearer": []}],
                "requestBody": uid_body,
                "responses": {"200": answer, **errors},
            }
        }

    return {
        "/v1/privacy/opt-out": post("Opt a cookie out: in no segment, never again (admin)"),
        "/v1/privacy/erase": post("Erase a cookie's data; report what was stored (admin)"),
        "/v1/privacy/consent": post("Record new consent: lift an erasure (admin)"),
        "/v1/privacy/users/{uid}": {
            "get": {
                "summary": "What is stored and suppressed for a cookie (admin)",
                "security": [{"bearer": []}],
                "parameters": [
                    {"name": "uid", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": answer, **errors},
            }
        },
    }
