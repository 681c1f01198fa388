"""The bid-time lookup service: an aiohttp app answering from an in-memory replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import orjson
from aiohttp import web

from bidder_adapter.app_keys import MATCH_FOLLOWER, PARTNERS
from bidder_adapter.routes import setup_partner_routes
from dmp.auth import lookup_caller
from dmp.auth_admin_routes import setup_admin_routes
from dmp.change_follower import ChangeFollower
from dmp.config import Settings
from dmp.gc_tuning import collect_after_load
from dmp.hot_route import uid_of
from dmp.limits import request_limits
from dmp.match_table_follower import MatchTableFollower
from dmp.metrics import CONTENT_TYPE, PARTNER_LABEL, LookupMetrics
from dmp.observed_routes import Handler, ObservedRoutes, SyncHandler, json_error, json_response
from dmp.privacy_follow import SUPPRESSION, SuppressionFollower
from dmp.privacy_routes import PRIVACY_FOLLOWER, setup_privacy
from dmp.redis_client import connect
from dmp.replica import Replica
from dmp.rule_versions import RuleVersions, RuleWatcher
from dmp.shards import parse_shard
from dmp.wire_response import WireResponse
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
RULES_POLL_INTERVAL = 1.0
MAX_UID_LENGTH = 128

SETTINGS = web.AppKey("settings", Settings)
RULES = web.AppKey("rules", CompiledRules)
METRICS = web.AppKey("metrics", LookupMetrics)
REPLICA = web.AppKey("replica", Replica)
FOLLOWER = web.AppKey("follower", ChangeFollower)
# Add routes through this (handlers observed), not app.router: dmp/observed_routes.py.
ROUTES = web.AppKey("routes", ObservedRoutes)
# GET /v1/users/{uid}/segments as observed, for the runner's dispatch (dmp/hot_route.py).
HOT_ROUTE: web.AppKey[Handler] = web.AppKey("hot_route")


def create_lookup_app(
    settings: Settings, rules: CompiledRules, metrics: LookupMetrics | None = None
) -> web.Application:
    metrics = metrics or LookupMetrics.create(multiproc_dir=settings.prometheus_multiproc_dir)
    app = web.Application(client_max_size=settings.security.max_body_bytes)
    routes = ObservedRoutes(app.router, metrics, request_limits(settings.security))
    app[ROUTES] = routes
    app[SETTINGS] = settings
    app[RULES] = rules
    app[METRICS] = metrics
    app[METRICS].set_rule_set(rules.version)
    app[REPLICA] = Replica(
        rules,
        cache_size=settings.lookup.answer_cache_size,
        shard=parse_shard(settings.lookup.shard, settings.kafka.partitions),
    )
    app.cleanup_ctx.append(_follow_changes)
    app.on_startup.append(_refuse_response_signals)
    hot = routes.add_get("/v1/users/{uid}/segments", user_segments_handler(app))
    app[HOT_ROUTE] = hot.handler
    routes.add_get("/healthz", healthz)
    routes.add_get("/readyz", readyz)
    routes.add_get("/metrics", metrics_endpoint)
    # Opt-outs and erasures (dmp/privacy_routes.py): before the partner routes, which filter too.
    setup_privacy(app, routes, settings, app[REPLICA])
    setup_admin_routes(routes)
    setup_partner_routes(app, routes, settings, app[REPLICA], app[METRICS].registry)
    return app


async def _refuse_response_signals(app: web.Application) -> None:
    """The bid-time answer (dmp/wire_response.py) runs no ``on_response_prepare`` signal:
    an app with one is refused when it starts, not silently bypassed."""
    if app.on_response_prepare:
        raise RuntimeError("the lookup app answers without on_response_prepare signals")


async def _follow_changes(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = connect(settings.redis)
    follower = ChangeFollower(
        client,
        app[REPLICA],
        app[METRICS],
        prefix=settings.redis.key_prefix,
        topic=settings.kafka.topic,
        block_ms=settings.lookup.follow_block_ms,
        snapshot_interval=settings.lookup.snapshot_interval_seconds,
        on_loaded=collect_after_load,
    )
    app[FOLLOWER] = follower
    stop = asyncio.Event()

    def swap_rules(rules: CompiledRules, number: int) -> None:
        # One assignment inside the replica: a request sees the old or the new version whole.
        app[REPLICA].set_rules(rules)
        app[METRICS].set_rule_set(rules.version)

    watcher = RuleWatcher(RuleVersions(client, settings.redis.key_prefix), app[RULES], swap_rules)

    async def watch_rules() -> None:
        while not stop.is_set():
            await asyncio.sleep(RULES_POLL_INTERVAL)
            try:
                await watcher.poll()
            except Exception as exc:
                log.warning("rule version check failed (%s)", exc)

    async def load_then_follow() -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                await watcher.poll()  # an applied version wins over the file we started with
                await follower.load_snapshot()
                break
            except Exception as exc:
                app[METRICS].redis_connected.set(0)
                log.warning("snapshot load failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        await follower.follow(stop)

    task = asyncio.create_task(load_then_follow(), name="change-follower")
    rules_task = asyncio.create_task(watch_rules(), name="rule-watcher")
    try:
        yield
    finally:
        stop.set()
        rules_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rules_task
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.aclose()


def user_segments_handler(app: web.Application) -> SyncHandler:
    """GET /v1/users/{uid}/segments, bound to ``app``'s objects.

    Served before the router too (dmp/hot_route.py), so it reads neither ``request.app``
    nor ``request.match_info``. The body is the replica's cached JSON document: the same
    bytes ``orjson`` makes of ``{"uid": ..., "segments": [...]}``.
    """
    settings, replica = app[SETTINGS], app[REPLICA]
    keyed = settings.security.lookup_auth == "key"

    def user_segments(request: web.Request) -> web.StreamResponse:
        # The path has the route's shape (the router or dispatch checked): the uid is the
        # middle, decoded as match_info would have it (a %2F in it is a '/').
        uid = uid_of(request.path)
        if len(uid) > MAX_UID_LENGTH:
            return json_error(400, f"uid must be 1 to {MAX_UID_LENGTH} characters")
        profile = None
        if keyed:
            caller, profile = lookup_caller(request, settings, app.get(PARTNERS))
            if caller is None:
                return json_error(401, "missing or unknown API key (Authorization: Bearer <key>)")
        if app[SUPPRESSION].blocks(uid):
            # Opted out or erased (or the list is still loading).
            body = orjson.dumps({"uid": uid, "segments": []})
        elif profile is None:
            body = replica.document(uid)
        else:
            request[PARTNER_LABEL] = profile.partner_id  # the request metrics, by partner
            granted = profile.granted_segments
            segments = [s for s in replica.segments(uid) if s in granted]
            body = orjson.dumps({"uid": uid, "segments": segments})
        if request.method == "GET":
            return WireResponse(body)  # status line, headers and body in one write
        return web.Response(body=body, content_type="application/json")  # HEAD: no body

    return user_segments


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    followers: list[ChangeFollower | SuppressionFollower | MatchTableFollower] = [
        app[FOLLOWER],
        app[PRIVACY_FOLLOWER],
    ]
    if MATCH_FOLLOWER in app:  # with partner routes, buyeruids resolve through it
        followers.append(app[MATCH_FOLLOWER])
    shard = app[REPLICA].shard
    held = {} if shard is None else {"shard": shard.label, "partitions": shard.owned_partitions}
    if not all(f.ready.is_set() for f in followers):
        return json_response({"status": "loading", **held}, 503)
    if not all(f.healthy for f in followers):
        # Still answering from memory, but no longer following Redis.
        return json_response({"status": "degraded", **held}, 503)
    return json_response({"status": "ready", **held})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
