"""The lookup app's routes, each handler wrapped in the per-request bookkeeping itself.

Limits, errors as JSON, request ids in logs, the latency histogram and the in-flight gauge.
This used to be an aiohttp middleware; a middleware makes aiohttp build a handler chain and
add its own `_fix_request_current_app` frame, which cost ~8 us of the ~50 us a bid-time
lookup took (docs/decisions/0008). A wrapper made once per route costs one call.

Unknown paths and methods reach a catch-all route, so they get the same JSON errors and
metrics (label `unmatched`, never the raw path) without a middleware.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import orjson
from aiohttp import web

from dmp.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id
from dmp.metrics import (
    DEADLINE_OUTCOME,
    NO_PARTNER,
    OUTCOME_HEADER,
    PARTNER_LABEL,
    LookupMetrics,
)
from dmp.shards import MISDIRECTED, SHARD_HEADER, Misdirected

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A handler that never waits (the bid-time lookup): called without a coroutine of its own.
SyncHandler = Callable[[web.Request], web.StreamResponse]
Refusal = Callable[[web.Request], web.Response | None]
UNMATCHED = "unmatched"
_CATCH_ALL = "/{unmatched_path:.*}"


class RouteAdder(Protocol):
    """What route set-up functions need: `ObservedRoutes`, or a bare `web.UrlDispatcher`."""

    def add_get(self, path: str, handler: Handler) -> object: ...

    def add_post(self, path: str, handler: Handler) -> object: ...


def json_response(doc: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def json_error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


class ObservedRoutes:
    """Adds routes to an app's router with every handler observed (see the module doc)."""

    def __init__(self, router: web.UrlDispatcher, metrics: LookupMetrics, refusal: Refusal):
        self._router = router
        self._metrics = metrics
        self._refusal = refusal
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count()
        self._children: dict[tuple[str, int, str], Any] = {}
        # In one process the in-flight gauge reads a plain counter at scrape time: inc/dec
        # take the gauge's mutex, about 1 us a request. Worker processes need the shared
        # file values.
        self._in_flight = [0]
        self._shared_gauge = metrics.multiproc_dir is not None
        if not self._shared_gauge:
            metrics.in_flight.set_function(lambda: self._in_flight[0])
        catch_all = self._router.add_route(
            "*", _CATCH_ALL, self.observe(UNMATCHED, self._unmatched)
        )
        # The resource answering unknown paths: not an API route (the OpenAPI test skips it).
        self.catch_all = catch_all.resource

    def add_get(self, path: str, handler: Handler | SyncHandler) -> web.AbstractRoute:
        return self._router.add_get(path, self.observe(path, handler))

    def add_post(self, path: str, handler: Handler) -> web.AbstractRoute:
        return self._router.add_post(path, self.observe(path, handler))

    def observe(self, endpoint: str, handler: Handler | SyncHandler) -> Handler:
        """`handler` with the bookkeeping around it; `endpoint` is its metric label."""
        waits = inspect.iscoroutinefunction(handler)
        async_handler, sync_handler = cast(Handler, handler), cast(SyncHandler, handler)
        metrics, refusal, children = self._metrics, self._refusal, self._children
        prefix, counter, in_flight = self._prefix, self._counter, self._in_flight
        shared_gauge = self._shared_gauge
        set_request_id, reset_request_id = REQUEST_ID.set, REQUEST_ID.reset

        async def observed(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            if shared_gauge:
                metrics.in_flight.inc()
            else:
                in_flight[0] += 1
            # A partner route relabels it; read back without Mapping.get's KeyError path.
            request[PARTNER_LABEL] = NO_PARTNER
            header = request.headers.get(REQUEST_ID_HEADER)
            token = set_request_id(request_id(header) if header else f"{prefix}-{next(counter)}")
            status = 500
            outcome = None
            try:
                refused = refusal(request)
                if refused is not None:
                    response: web.StreamResponse = refused
                elif waits:
                    response = await async_handler(request)
                else:
                    response = sync_handler(request)
                status = response.status
                outcome = response.headers.get(OUTCOME_HEADER)
                return response
            except web.HTTPException as exc:
                status = exc.status
                return json_error(exc.status, exc.reason)
            except Misdirected as exc:  # a sharded replica asked about another shard's cookie
                status = MISDIRECTED
                response = json_response(exc.doc(), MISDIRECTED)
                response.headers[SHARD_HEADER] = exc.owner_label
                return response
            except Exception:
                log.exception("unhandled error on %s", endpoint)
                return json_error(500, "internal error")
            finally:
                reset_request_id(token)
                if shared_gauge:
                    metrics.in_flight.dec()
                else:
                    in_flight[0] -= 1
                partner = request[PARTNER_LABEL]
                key = (endpoint, status, partner)
                child = children.get(key)
                if child is None:
                    child = children[key] = metrics.request_seconds.labels(
                        endpoint, str(status), partner
                    )
                child.observe(time.perf_counter() - started)
                if outcome == DEADLINE_OUTCOME:
                    metrics.deadline_empty.labels(partner).inc()

        return observed

    async def _unmatched(self, request: web.Request) -> web.Response:
        """404, or 405 with Allow when another method has this path (as aiohttp would say)."""
        allowed: set[str] = set()
        for resource in self._router.resources():
            if resource is not self.catch_all:
                _, methods = await resource.resolve(request)
                allowed |= methods
        if allowed:
            response = json_error(405, "Method Not Allowed")
            response.headers["Allow"] = ",".join(sorted(allowed))
            return response
        return json_error(404, "Not Found")
