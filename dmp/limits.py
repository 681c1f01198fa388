"""Request limits on the lookup app: header size, body size, per-key request rate.

Each refusal is a short JSON error (`{"error": ...}`) with the limit in it: 431 for headers,
413 for bodies, 429 with Retry-After for the rate. The body limit is also aiohttp's own
`client_max_size` (chunked bodies), and the HTTP parser accepts header lines up to
PARSER_LIMITS so that these checks, not the parser's plain-text 400, answer first.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from dmp.config import SecuritySettings

# Passed to web.AppRunner / TestServer: a line longer than this still gets the parser's 400.
PARSER_LIMITS = {"max_line_size": 65536, "max_field_size": 65536}
MAX_BUCKETS = 10_000  # distinct keys remembered; past it the table starts afresh


def limit_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": message}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key: `rate` per second, up to `burst` at once."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(burst or 2 * rate, 1.0)
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def wait_needed(self, key: str) -> float:
        """0 when the request may go now (and is counted); else seconds until it may."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


def presented_key(request: web.Request) -> str | None:
    """The API key from `Authorization: Bearer <key>` or `X-Api-Key: <key>`."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("X-Api-Key") or None


def request_limits(settings: SecuritySettings) -> Callable[[web.Request], web.Response | None]:
    """The refusal for a request over a limit, or None.

    Run around every lookup route (dmp/observed_routes.py).
    """
    limiter = RateLimiter(settings.rate_per_second, settings.rate_burst)
    max_headers = settings.max_header_bytes
    max_body = settings.max_body_bytes
    rate = settings.rate_per_second

    def refusal(request: web.Request) -> web.Response | None:
        size = sum(len(k) + len(v) for k, v in request.raw_headers)
        if size > max_headers:
            return limit_error(431, f"request headers over {max_headers} bytes")
        length = request.content_length
        if length is not None and length > max_body:
            return limit_error(413, f"request body over {max_body} bytes")
        if rate > 0:
            key = presented_key(request)
            if key is not None:
                # Keyed by a digest: the table never holds a presented key itself.
                digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
                wait = limiter.wait_needed(digest)
                if wait > 0:
                    return limit_error(
                        429,
                        f"over {rate:g} requests per second for this key",
                        {"Retry-After": str(max(1, math.ceil(wait)))},
                    )
        return None

    return refusal
