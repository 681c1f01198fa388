"""The bid-time lookup, answered before aiohttp's router (docs/decisions/0012).

``GET /v1/users/{uid}/segments`` is nearly every request a lookup replica serves. aiohttp's
``Application`` resolves each request through its router and runs ``_handle`` around the
handler: a few microseconds of a ~30 us request. The runner's low-level server takes a
dispatch instead, which hands that one shape of request straight to the same observed
handler the router holds, and everything else to the application as before. The route
stays registered, so the application alone (tests, HEAD, odd paths) answers identically.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from aiohttp.hdrs import EXPECT

from dmp.observed_routes import Handler

PREFIX = "/v1/users/"
SUFFIX = "/segments"
_PREFIX_LEN = len(PREFIX)
_SUFFIX_LEN = len(SUFFIX)

ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def uid_in_path(path: str) -> str | None:
    """The ``{uid}`` of ``/v1/users/{uid}/segments`` as aiohttp's router would match it.

    A dynamic part matches ``[^{}/]+``; a percent-encoded slash is decoded in ``path``
    (the router matched it encoded), so such a uid is left to the router.
    """
    if not (path.startswith(PREFIX) and path.endswith(SUFFIX)):
        return None
    uid = path[_PREFIX_LEN:-_SUFFIX_LEN]
    if not uid or "/" in uid or "{" in uid or "}" in uid:
        return None
    return uid


def uid_of(path: str) -> str:
    """The ``{uid}`` of a path already known to have the route's shape."""
    return path[_PREFIX_LEN:-_SUFFIX_LEN]


def serve_first(runner: web.AppRunner, handler: Handler) -> None:
    """Make ``runner``'s server (after ``setup()``) answer the lookup itself.

    ``handler`` must not read ``request.match_info`` or ``request.app``: the router, which
    sets them, is what this skips, and with it middlewares and ``on_response_prepare``
    signals; an application with either is refused rather than silently bypassed.
    """
    app, server = runner.app, runner.server
    if server is None:
        raise RuntimeError("serve_first needs a runner after setup()")
    if app.middlewares or app.on_response_prepare:
        raise RuntimeError("the lookup app has middlewares or response signals to run")
    app_handler: ServerHandler = server.request_handler

    # Not a coroutine function: it returns the chosen handler's coroutine, which aiohttp
    # awaits, so a request runs no coroutine of its own here. Left to the application:
    # percent-encoded targets (the router matches a %2F encoded, anywhere in the path) and
    # requests with Expect (which the application answers before any handler).
    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        if (
            request.method == "GET"
            and "%" not in request.raw_path
            and EXPECT not in request.headers
            and uid_in_path(request.path) is not None
        ):
            # A web.Request: the runner's request factory makes them.
            return handler(cast(web.Request, request))
        return app_handler(request)

    server.request_handler = dispatch
