"""ID sync pixels, both directions of OpenRTB 2.6 Appendix C.

- Partner-initiated (we hold the table): the partner's sync URL redirects the browser to
  `GET /v1/sync/{partner}/setuid?uid=<their id>`; we read our first-party cookie (or set a
  new one) and store their id -> our cookie id for the configured TTL.
- Ours (they hold the table): `GET /v1/sync/{partner}/redirect` reads or sets our cookie and
  answers 302 to the partner's `sync_url` with `${UID}` replaced by our cookie id.

Both honour `gdpr`, `gdpr_consent`, `gpp` and `gpp_sid`: without consent where GDPR
applies they answer 204 at once, read no cookie, set none and store nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from bidder_adapter.app_keys import MATCH_STORE, PARTNER_METRICS, PARTNER_SETTINGS, PARTNERS
from bidder_adapter.sync import (
    PIXEL_GIF,
    fill_sync_url,
    has_sync_consent,
    mint_cookie_id,
    valid_cookie_id,
)
from dmp.match_table import MAX_PARTNER_UID_LENGTH
from dmp.observed_routes import RouteAdder
from dmp.redis_client import REDIS_FAILURES

if TYPE_CHECKING:
    from bidder_adapter.profiles import PartnerProfile

log = logging.getLogger(__name__)
DAY = 86400
NO_STORE = {"Cache-Control": "no-store"}


def add_sync_routes(routes: RouteAdder) -> None:
    routes.add_get("/v1/sync/{partner_id}/setuid", sync_setuid)
    routes.add_get("/v1/sync/{partner_id}/redirect", sync_redirect)


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}),
        status=status,
        content_type="application/json",
        headers=NO_STORE,
    )


def _partner(request: web.Request) -> PartnerProfile | None:
    return request.app[PARTNERS].current.profiles.get(request.match_info["partner_id"])


def _our_cookie(request: web.Request) -> tuple[str, bool]:
    """Our first-party cookie id, or a new one; and whether it is new."""
    value = request.cookies.get(request.app[PARTNER_SETTINGS].partner.cookie_name)
    if valid_cookie_id(value):
        assert value is not None
        return value, False
    return mint_cookie_id(), True


def _set_cookie(request: web.Request, response: web.StreamResponse, cookie_id: str) -> None:
    """(Re)set our cookie; SameSite=None needs Secure, and sync pixels run in third-party frames."""
    settings = request.app[PARTNER_SETTINGS].partner
    response.set_cookie(
        settings.cookie_name,
        cookie_id,
        max_age=settings.cookie_max_age_days * DAY,
        domain=settings.cookie_domain or None,
        path="/",
        secure=True,
        httponly=True,
        samesite="None",
    )


def _count(request: web.Request, partner_id: str, direction: str, result: str) -> None:
    request.app[PARTNER_METRICS].syncs.labels(partner_id, direction, result).inc()


async def sync_setuid(request: web.Request) -> web.StreamResponse:
    profile = _partner(request)
    if profile is None or "buyeruid" not in profile.user_id_sources:
        return _error(404, "no such partner, or it does not send buyeruid")
    if not has_sync_consent(request.query):
        _count(request, profile.partner_id, "in", "no_consent")
        return web.Response(status=204, headers=NO_STORE)
    partner_uid = request.query.get("uid", "")
    if not 0 < len(partner_uid) <= MAX_PARTNER_UID_LENGTH or not partner_uid.isprintable():
        _count(request, profile.partner_id, "in", "bad_uid")
        return _error(400, f"uid: the partner's user id, 1 to {MAX_PARTNER_UID_LENGTH} characters")
    cookie_id, _ = _our_cookie(request)
    try:
        await request.app[MATCH_STORE].record(profile.partner_id, partner_uid, cookie_id)
    except REDIS_FAILURES as exc:
        log.warning("sync for %s not stored: %s", profile.partner_id, exc)
        _count(request, profile.partner_id, "in", "store_error")
        return _error(503, "match table unavailable")
    _count(request, profile.partner_id, "in", "stored")
    response = web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)
    _set_cookie(request, response, cookie_id)
    return response


async def sync_redirect(request: web.Request) -> web.StreamResponse:
    profile = _partner(request)
    if profile is None or not profile.sync_url:
        return _error(404, "no such partner, or it has no sync_url")
    if not has_sync_consent(request.query):
        _count(request, profile.partner_id, "out", "no_consent")
        return web.Response(status=204, headers=NO_STORE)
    cookie_id, _ = _our_cookie(request)
    location = fill_sync_url(profile.sync_url, cookie_id, request.query)
    _count(request, profile.partner_id, "out", "redirected")
    # Returned, not raised: every route's wrapper (dmp/observed_routes.py) turns raised HTTP
    # errors into JSON.
    response = web.Response(status=302, headers={"Location": location, **NO_STORE})
    _set_cookie(request, response, cookie_id)
    return response
