"""Admin-only reads on the lookup app: the rule set in force and segment size estimates.

Both need the admin key (dmp/auth.py). Estimates read the segment bitmaps from Redis
(dmp/audience.py), never the bid path's memory, so they cost Redis time, not lookup time.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from dmp.audience import Audience
from dmp.auth import admin_refusal
from dmp.limits import limit_error
from dmp.observed_routes import RouteAdder
from dmp.privacy_routes import PRIVACY_REPLICA, PRIVACY_SETTINGS, PRIVACY_STORE
from dmp.redis_client import REDIS_FAILURES

log = logging.getLogger(__name__)


def setup_admin_routes(routes: RouteAdder) -> None:
    """Call after dmp.privacy_routes.setup_privacy, whose Redis client these share."""
    routes.add_get("/v1/admin/rules", rules_in_force)
    routes.add_get("/v1/admin/segments/{segment_id}/estimate", estimate)


def _json(doc: object) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def rules_in_force(request: web.Request) -> web.Response:
    refused = admin_refusal(request, request.app[PRIVACY_SETTINGS])
    if refused is not None:
        return refused
    rules = request.app[PRIVACY_REPLICA].rules
    segments = rules.ruleset.segments
    return _json(
        {
            "version": rules.version,
            "segments": [{"id": s.id, "status": s.status} for s in segments],
        }
    )


async def estimate(request: web.Request) -> web.Response:
    refused = admin_refusal(request, request.app[PRIVACY_SETTINGS])
    if refused is not None:
        return refused
    settings = request.app[PRIVACY_SETTINGS]
    rules = request.app[PRIVACY_REPLICA].rules
    segment_id = request.match_info["segment_id"]
    if segment_id not in {s.id for s in rules.ruleset.segments}:
        return limit_error(404, f"unknown segment {segment_id[:64]!r}")
    audience = Audience(
        request.app[PRIVACY_STORE].client, settings.redis.key_prefix, settings.kafka.topic, rules
    )
    try:
        members = await audience.estimate(segment_id)
    except REDIS_FAILURES as exc:
        log.warning("estimate unavailable (%s)", exc)
        return limit_error(503, "store unavailable, try again")
    status = audience.status(segment_id)  # "paused": built, not answered by lookups
    return _json({"segment": segment_id, "members": members, "status": status})


def openapi_paths() -> dict[str, Any]:
    error = {
        "description": "Refused; the body says why.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    ok = {
        "description": "The answer.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    errors = {str(code): error for code in (401, 403, 404, 429, 503)}
    return {
        "/v1/admin/rules": {
            "get": {
                "summary": "The rule set in force (admin)",
                "security": [{"bearer": []}],
                "responses": {"200": ok, **errors},
            }
        },
        "/v1/admin/segments/{segment_id}/estimate": {
            "get": {
                "summary": "Members of a segment, composites included, from Redis (admin)",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "segment_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": ok, **errors},
            }
        },
    }
