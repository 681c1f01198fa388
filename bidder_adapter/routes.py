"""The partner endpoints, added to the lookup app by one call: `setup_partner_routes`.

Every answer comes from memory (the app's replica and the match table this module keeps
in step with Redis); only the ID sync pixel writes to Redis. Each request reads the partner
configuration once (`registry.current`), so a reload never shows it half of a version.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Mapping

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from bidder_adapter import jsonio
from bidder_adapter.answer import ID_TYPES, Answerer, IdType, id_type_allowed, lookup_answer
from bidder_adapter.app_keys import (
    ANSWERER,
    MATCH_FOLLOWER,
    MATCH_METRICS,
    MATCH_STORE,
    MATCH_TABLE,
    OPENAPI,
    PARTNER_METRICS,
    PARTNER_SETTINGS,
    PARTNERS,
)
from bidder_adapter.following import following
from bidder_adapter.openapi import openapi_document
from bidder_adapter.openrtb import (
    build_data_object,
    enrich_parsed,
    enrich_request,
    find_user_ids,
    gdpr_applies_without_consent,
)
from bidder_adapter.partner_file import PartnerConfig
from bidder_adapter.partner_metrics import PartnerMetrics
from bidder_adapter.partner_registry import PartnerRegistry
from bidder_adapter.prebid import build_rtd_answer
from bidder_adapter.profiles import PartnerProfile, hash_api_key
from bidder_adapter.sync import valid_cookie_id
from bidder_adapter.sync_routes import add_sync_routes
from dmp.config import Settings
from dmp.match_table import MAX_PARTNER_UID_LENGTH, MatchTable, MatchTableStore, check_ttl_days
from dmp.match_table_follower import MatchTableFollower, MatchTableMetrics
from dmp.metrics import OUTCOME_HEADER, PARTNER_LABEL
from dmp.observed_routes import RouteAdder
from dmp.privacy_follow import SUPPRESSION, SuppressedSegments
from dmp.redis_client import connect
from dmp.replica import Replica

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Partner-Config-Version"


def setup_partner_routes(
    app: web.Application,
    routes: RouteAdder,
    settings: Settings,
    replica: Replica,
    registry: CollectorRegistry,
) -> None:
    """Add the partner endpoints and their background work (match table, file watch).

    Loads the partner file now: a bad file raises PartnerFileError and the app is not built.
    """
    check_ttl_days(settings.partner.match_ttl_days)
    metrics = PartnerMetrics.create(registry)
    partners = PartnerRegistry(
        settings.partners_path,
        metrics,
        known_segments=[s.id for s in replica.rules.ruleset.segments],
    )
    partners.load()
    table = MatchTable()
    app[PARTNER_SETTINGS] = settings
    app[PARTNERS] = partners
    app[PARTNER_METRICS] = metrics
    app[MATCH_TABLE] = table
    app[MATCH_METRICS] = MatchTableMetrics.create(registry)
    # Opted-out and erased cookies are in no segment for any partner (dmp/privacy_follow.py).
    source = SuppressedSegments(replica, app[SUPPRESSION]) if SUPPRESSION in app else replica
    app[ANSWERER] = Answerer(source, table)
    app.cleanup_ctx.append(_partner_background)
    routes.add_get("/v1/partner/users/{user_id}/segments", partner_user_segments)
    routes.add_post("/v1/partner/segments/batch", partner_batch_segments)
    routes.add_post("/v1/openrtb/enrich", openrtb_enrich)
    routes.add_post("/v1/prebid/rtd", prebid_rtd)
    routes.add_post("/v1/admin/partners/reload", admin_reload)
    add_sync_routes(routes)
    app[OPENAPI] = orjson.dumps(openapi_document(), option=orjson.OPT_INDENT_2)
    routes.add_get("/openapi.json", openapi_json)


async def _partner_background(app: web.Application) -> AsyncIterator[None]:
    settings = app[PARTNER_SETTINGS]
    client = connect(settings.redis)
    try:
        app[MATCH_STORE] = MatchTableStore(
            client,
            prefix=settings.redis.key_prefix,
            ttl_days=settings.partner.match_ttl_days,
            stream_maxlen=settings.partner.match_stream_maxlen,
        )
        follower = MatchTableFollower(
            client,
            app[MATCH_TABLE],
            app[MATCH_METRICS],
            prefix=settings.redis.key_prefix,
            block_ms=settings.lookup.follow_block_ms,
        )
        app[MATCH_FOLLOWER] = follower
        async with following(follower, _FileWatch(app[PARTNERS], settings)):
            yield
    finally:
        await client.aclose()


class _FileWatch:
    """The partner-file poll, run by `following` like the stream followers."""

    def __init__(self, registry: PartnerRegistry, settings: Settings) -> None:
        self.registry = registry
        self.interval = settings.partner.reload_poll_seconds
        self.ready = asyncio.Event()

    async def load_snapshot(self) -> None:
        self.ready.set()  # loaded in setup_partner_routes already

    async def follow(self, stop: asyncio.Event) -> None:
        await self.registry.watch(stop, self.interval)


def _json(doc: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


def presented_key(request: web.Request) -> str | None:
    """The API key from `Authorization: Bearer <key>` or `X-Api-Key: <key>`."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-Api-Key") or None


def _authenticate(request: web.Request) -> tuple[PartnerConfig, PartnerProfile | None]:
    config = request.app[PARTNERS].current
    key = presented_key(request)
    profile = config.profiles.by_api_key(key) if key else None
    if profile is not None:
        request[PARTNER_LABEL] = profile.partner_id  # the app's request metrics, by partner
    return config, profile


def _unauthorized(config: PartnerConfig) -> web.Response:
    return _error(
        401,
        "missing or unknown API key (Authorization: Bearer <key> or X-Api-Key)",
        {"WWW-Authenticate": 'Bearer realm="dmp"', VERSION_HEADER: config.short_version},
    )


def _as_id_type(value: str) -> IdType | None:
    if value == "cookie":
        return "cookie"
    if value == "buyeruid":
        return "buyeruid"
    return None


def _check_user_id(user_id: str, id_type: IdType) -> str | None:
    if id_type == "cookie":
        return None if valid_cookie_id(user_id) else "id: not a valid cookie id"
    if not 0 < len(user_id) <= MAX_PARTNER_UID_LENGTH:
        return f"id: must be 1 to {MAX_PARTNER_UID_LENGTH} characters"
    return None


async def partner_user_segments(request: web.Request) -> web.Response:
    config, profile = _authenticate(request)
    if profile is None:
        return _unauthorized(config)
    headers = {VERSION_HEADER: config.short_version}
    user_id = request.match_info["user_id"]
    id_type = _as_id_type(request.query.get("id_type", "cookie"))
    if id_type is None:
        return _error(400, f"id_type: must be one of {', '.join(ID_TYPES)}", headers)
    if (problem := _check_user_id(user_id, id_type)) is not None:
        return _error(400, problem, headers)
    if not id_type_allowed(profile, id_type):
        return _error(
            403, f"id_type {id_type} is not among this partner's user id sources", headers
        )
    answerer = request.app[ANSWERER]
    theirs = answerer.view_of(profile, answerer.cookie_for(profile, user_id, id_type))
    request.app[PARTNER_METRICS].answers.labels(
        profile.partner_id, "lookup", "found" if theirs else "empty"
    ).inc()
    return _json(lookup_answer(profile, user_id, theirs), headers=headers)


async def partner_batch_segments(request: web.Request) -> web.Response:
    config, profile = _authenticate(request)
    if profile is None:
        return _unauthorized(config)
    headers = {VERSION_HEADER: config.short_version}
    limit = request.app[PARTNER_SETTINGS].partner.max_batch_users
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "body: not valid JSON", headers)
    users = doc.get("users") if isinstance(doc, dict) else None
    if not isinstance(users, list):
        return _error(400, 'body: expected {"users": [{"id": ..., "id_type": ...}, ...]}', headers)
    if len(users) > limit:
        return _error(413, f"users: at most {limit} per batch, got {len(users)}", headers)
    answerer = request.app[ANSWERER]
    results: list[dict[str, object]] = []
    found = 0
    for index, item in enumerate(users):
        user_id = item.get("id") if isinstance(item, dict) else None
        raw_type = item.get("id_type", "cookie") if isinstance(item, dict) else None
        id_type = _as_id_type(raw_type) if isinstance(raw_type, str) else None
        if not isinstance(user_id, str) or id_type is None:
            return _error(
                400, f"users[{index}]: needs a string id and id_type cookie or buyeruid", headers
            )
        if (problem := _check_user_id(user_id, id_type)) is not None:
            return _error(400, f"users[{index}].{problem}", headers)
        if not id_type_allowed(profile, id_type):
            return _error(
                403, f"users[{index}]: id_type {id_type} is not allowed for this partner", headers
            )
        theirs = answerer.view_of(profile, answerer.cookie_for(profile, user_id, id_type))
        found += bool(theirs)
        results.append({**lookup_answer(profile, user_id, theirs), "id_type": id_type})
    metrics = request.app[PARTNER_METRICS].answers
    metrics.labels(profile.partner_id, "batch", "found").inc(found)
    metrics.labels(profile.partner_id, "batch", "empty").inc(len(results) - found)
    return _json({"users": results}, headers=headers)


async def openrtb_enrich(request: web.Request) -> web.Response:
    config, profile = _authenticate(request)
    if profile is None:
        return _unauthorized(config)
    mode = request.query.get("mode", "full")
    if mode not in ("full", "fragment"):
        return _error(400, "mode: must be full or fragment")
    raw = await request.read()
    try:
        doc = jsonio.loads(raw)
    except ValueError:
        return _error(400, "body: not a valid JSON BidRequest")
    if not isinstance(doc, dict):
        return _error(400, "body: a BidRequest is a JSON object")
    # Our cookie id out of band, from a caller that keeps the match table itself
    # (Appendix C's bidder-hosted sync); tried where the partner's sources say "cookie".
    uid = request.query.get("uid")
    if uid is not None and not valid_cookie_id(uid):
        return _error(400, "uid: not a valid cookie id")
    settings = request.app[PARTNER_SETTINGS].partner
    decision = request.app[ANSWERER].decide(
        profile, doc, min_tmax_ms=settings.min_tmax_ms, first_party=uid
    )
    if decision.data is None:
        body = raw if mode == "full" else b"{}"
    elif mode == "full":
        body = enrich_parsed(doc, raw, decision.data)
    else:
        body = enrich_request(raw, decision.data, "fragment")
    request.app[PARTNER_METRICS].answers.labels(
        profile.partner_id, "enrich", decision.outcome
    ).inc()
    return web.Response(
        body=body,
        content_type="application/json",
        headers={VERSION_HEADER: config.short_version, OUTCOME_HEADER: decision.outcome},
    )


async def prebid_rtd(request: web.Request) -> web.Response:
    """Prebid RTD answer: `ortb2Fragments` with the caller's view global, bidders' per bidder."""
    config, profile = _authenticate(request)
    if profile is None:
        return _unauthorized(config)
    headers = {VERSION_HEADER: config.short_version}
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "body: not valid JSON", headers)
    ortb2 = doc.get("ortb2", {}) if isinstance(doc, dict) else None
    bidders = doc.get("bidders", []) if isinstance(doc, dict) else None
    if not isinstance(ortb2, dict) or not isinstance(bidders, list):
        return _error(400, 'body: expected {"ortb2": {...}, "bidders": ["code", ...]}', headers)
    if not all(isinstance(b, str) and b for b in bidders):
        return _error(400, "bidders: must be non-empty strings (Prebid bidder codes)", headers)
    settings = request.app[PARTNER_SETTINGS].partner
    first_party = request.cookies.get(settings.cookie_name)
    if not valid_cookie_id(first_party):
        first_party = None
    outcome = "gdpr"
    segments: tuple[str, ...] = ()
    if not gdpr_applies_without_consent(ortb2):
        found = request.app[ANSWERER].find(profile, find_user_ids(ortb2), first_party)
        segments = found.segments
        outcome = "no_user" if found.cookie_id is None else "answered"
    per_bidder: dict[str, dict[str, object] | None] = {}
    for code in bidders:
        bidder = config.profiles.by_prebid_bidder(code)
        theirs = bidder.view(segments) if bidder is not None else []
        per_bidder[code] = build_data_object(bidder, theirs) if bidder and theirs else None
    ours = profile.view(segments)
    answer = build_rtd_answer(build_data_object(profile, ours) if ours else None, per_bidder)
    request.app[PARTNER_METRICS].answers.labels(profile.partner_id, "rtd", outcome).inc()
    return _json(answer, headers=headers)


async def admin_reload(request: web.Request) -> web.Response:
    wanted = request.app[PARTNER_SETTINGS].partner.admin_key_sha256.lower()
    if not wanted:
        return _error(403, "admin API disabled: set DMP_PARTNER_ADMIN_KEY_SHA256")
    key = presented_key(request)
    if key is None or not hmac.compare_digest(hash_api_key(key), wanted):
        return _error(
            401, "missing or wrong admin key", {"WWW-Authenticate": 'Bearer realm="dmp-admin"'}
        )
    result = request.app[PARTNERS].reload()
    doc: dict[str, object] = {
        "version": result.config.short_version,
        "changed": result.changed,
        "partners": len(result.config.profiles),
    }
    if not result.ok:
        # file:line:column stays, the server's folders do not (docs/security.md).
        path = request.app[PARTNER_SETTINGS].partners_path
        where = str(path) if path is not None else ""
        doc["errors"] = [e.replace(where, path.name) if path else e for e in result.errors]
        return _json(doc, 422)
    return _json(doc)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
