"""GET /v1/users/{uid}/segments served before the router (dmp/hot_route.py).

Two real servers of the lookup app, one with ``serve_first`` installed as
``dmp.services.serve_lookup`` installs it and one without, must send the same bytes for
any request. Requests are written on raw sockets so no client normalises the path.

Redis points at a closed port: the replica is filled here and the suppression list marked
loaded, so the answers come from memory alone (as tests/ops/test_lookup_metrics.py does).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bidder_adapter.profiles import hash_api_key
from dmp.config import Settings
from dmp.hot_route import serve_first, uid_in_path
from dmp.ids import position, uid_hash
from dmp.limits import PARSER_LIMITS
from dmp.lookup import HOT_ROUTE, MAX_UID_LENGTH, REPLICA, create_lookup_app
from dmp.observed_routes import Handler
from dmp.privacy_follow import SUPPRESSION
from segment_rules import CompiledRules, load_rules_file
from tests.bidder_adapter.partner_yaml import ACME_KEY, ADMIN_KEY, BETA_KEY, partner_yaml
from tests.conftest import EXAMPLE_RULES
from tests.ops.test_logs import free_port

SEGMENTS = "/v1/users/{uid}/segments"
KNOWN = ["auto_new_car_intent", "geo_socal", "new_car_socal"]  # the composite too


@pytest.mark.parametrize(
    ("path", "uid"),
    [
        ("/v1/users/abc/segments", "abc"),
        ("/v1/users/a b%c/segments", "a b%c"),  # request.path is decoded already
        ("/v1/users/caf\u00e9/segments", "caf\u00e9"),
        ("/v1/users/./segments", "."),
        ("/v1/users/x/segments/segments", None),  # "x/segments": a slash
        ("/v1/users//segments", None),
        ("/v1/users/segments", None),  # prefix and suffix share the slash
        ("/v1/users/a/b/segments", None),
        ("/v1/users/{uid}/segments", None),
        ("/v1/users/a{/segments", None),
        ("/v1/users/a}/segments", None),
        ("//v1/users/abc/segments", None),
        ("/v1/users/abc/segments/", None),
        ("/v1/users/abc", None),
        ("/users/abc/segments", None),
        ("/v1/user/abc/segments", None),
        ("/v1/users/abc/segment", None),
        ("/V1/users/abc/segments", None),
        ("", None),
        ("/", None),
    ],
)
def test_uid_in_path(path: str, uid: str | None) -> None:
    assert uid_in_path(path) == uid


# -- Two servers of the lookup app ----------------------------------------------------------


@dataclass
class Served:
    app: web.Application
    runner: web.AppRunner
    port: int


async def serve(settings: Settings, rules: CompiledRules, *, hot: bool) -> Served:
    app = create_lookup_app(settings, rules)
    replica = app[REPLICA]
    uids = {"known": position(0, 1), "a b": position(1, 1), "a/b": position(1, 2)}
    replica.add_ids((pos, uid_hash(uid)) for uid, pos in uids.items())
    replica.add("auto_new_car_intent", [position(0, 1), position(1, 2)])
    replica.add("geo_socal", [position(0, 1), position(1, 1)])
    app[SUPPRESSION].replace(set())  # loaded, and empty: nobody opted out
    runner = web.AppRunner(  # as dmp.services.serve_lookup makes it
        app,
        access_log=None,
        max_line_size=PARSER_LIMITS["max_line_size"],
        max_field_size=PARSER_LIMITS["max_field_size"],
    )
    await runner.setup()
    assert runner.server is not None
    if hot:
        routed = runner.server.request_handler
        serve_first(runner, app[HOT_ROUTE])
        assert runner.server.request_handler is not routed
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Served(app, runner, runner.addresses[0][1])


def lookup_settings(extra: Mapping[str, str] = {}) -> Settings:
    # Nothing listens there: the followers retry in the background, the replica is ours.
    return Settings.from_env({"DMP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", **extra})


@pytest.fixture(scope="module")
def rules() -> CompiledRules:
    return CompiledRules(load_rules_file(EXAMPLE_RULES))


@dataclass
class Pair:
    hot: Served
    routed: Served


async def start_pair(settings: Settings, rules: CompiledRules) -> AsyncIterator[Pair]:
    hot = await serve(settings, rules, hot=True)
    try:
        routed = await serve(settings, rules, hot=False)
        try:
            yield Pair(hot, routed)
        finally:
            await routed.runner.cleanup()
    finally:
        await hot.runner.cleanup()


@pytest.fixture
async def pair(rules: CompiledRules) -> AsyncIterator[Pair]:
    async for p in start_pair(lookup_settings(), rules):
        yield p


@pytest.fixture
async def keyed_pair(tmp_path: Path, rules: CompiledRules) -> AsyncIterator[Pair]:
    partners = tmp_path / "partners.yaml"
    partners.write_text(partner_yaml())
    settings = lookup_settings(
        {
            "DMP_SECURITY_LOOKUP_AUTH": "key",
            "DMP_PARTNER_ADMIN_KEY_SHA256": hash_api_key(ADMIN_KEY),
            "DMP_PARTNERS_PATH": str(partners),
            # One request per key and then 429 (the bucket refills in ~17 minutes).
            "DMP_SECURITY_RATE_PER_SECOND": "0.001",
            "DMP_SECURITY_RATE_BURST": "1",
        }
    )
    async for p in start_pair(settings, rules):
        yield p


# -- Raw HTTP -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # in order, without Date
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> object:
        return orjson.loads(self.body)


def request(target: str, method: str = "GET", headers: str = "", body: bytes = b"") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: lookup\r\n{headers}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode("utf-8") + body


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


def parse(data: bytes, *, head: bool = False) -> list[Answer]:
    """Every response on the connection (interim 1xx ones included)."""
    answers = []
    while data:
        top, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = top.split(b"\r\n")
        headers = tuple(
            (key, value.strip())
            for key, _, value in (line.partition(b":") for line in lines)
            if key.lower() != b"date"
        )
        answer = Answer(status_line, headers, b"")
        length = answer.header(b"Content-Length")
        if length is not None and not head and answer.status >= 200:
            answer = Answer(status_line, headers, data[: int(length)])
            data = data[int(length) :]
        answers.append(answer)
    return answers


async def both(pair: Pair, raw: bytes, *, head: bool = False) -> list[Answer]:
    """The hot server's responses, after checking the router's are the same bytes."""
    hot = parse(await exchange(pair.hot.port, raw), head=head)
    routed = parse(await exchange(pair.routed.port, raw), head=head)
    assert hot == routed, raw
    return hot


def answered(uid: str, segments: list[str]) -> bytes:
    return orjson.dumps({"uid": uid, "segments": segments})


# -- The same answers -----------------------------------------------------------------------

LONGEST = "x" * MAX_UID_LENGTH


NOT_FOUND = b'{"error":"Not Found"}'
# (request target, status, body; None: the 400 for a uid out of bounds)
GETS = [
    ("/v1/users/known/segments", 200, answered("known", KNOWN)),
    ("/v1/users/known/segments?x=1&uid=other", 200, answered("known", KNOWN)),
    ("http://lookup/v1/users/known/segments", 200, answered("known", KNOWN)),
    ("/%761/users/known/segments", 200, answered("known", KNOWN)),  # an encoded "v"
    ("/v1/users/stranger/segments", 200, answered("stranger", [])),
    ("/v1/users/a%20b/segments", 200, answered("a b", ["geo_socal"])),
    ("/v1/users/caf%C3%A9/segments", 200, answered("caf\u00e9", [])),
    ("/v1/users/q%22%5C/segments", 200, answered('q"\\', [])),
    ("/v1/users/100%25/segments", 200, answered("100%", [])),
    ("/v1/users/%252F/segments", 200, answered("%2F", [])),
    ("/v1/users/%FF/segments", 200, answered("%FF", [])),  # not UTF-8: kept encoded
    ("/v1/users/./segments", 200, answered(".", [])),
    (f"/v1/users/{LONGEST}/segments", 200, answered(LONGEST, [])),
    (f"/v1/users/{LONGEST}x/segments", 400, None),
    (f"/v1/users/{LONGEST[1:]}%20/segments", 200, answered(LONGEST[1:] + " ", [])),
    (f"/v1/users/{LONGEST}%20/segments", 400, None),
    # An encoded slash is left to the router, which matches it (uid "a/b").
    ("/v1/users/a%2Fb/segments", 200, answered("a/b", ["auto_new_car_intent"])),
    ("/v1/users/a%2fb/segments", 200, answered("a/b", ["auto_new_car_intent"])),
    ("/v1/users/%2F/segments", 200, answered("/", [])),
    ("/v1/users/%7Buid%7D/segments", 404, NOT_FOUND),
    ("/v1/users/a%7D/segments", 404, NOT_FOUND),
    ("/v1/users//segments", 404, NOT_FOUND),
    ("/v1/users/segments", 404, NOT_FOUND),
    ("/v1/users/known/segments/", 404, NOT_FOUND),
    ("//v1/users/known/segments", 404, NOT_FOUND),
    ("/v1/users/known/extra/segments", 404, NOT_FOUND),
    ("/healthz", 200, b'{"status":"ok"}'),
]


async def test_get_is_answered_as_the_router_answers(pair: Pair) -> None:
    # One pair of servers for every case: starting and stopping them costs ~0.6 s.
    for target, status, body in GETS:
        (answer,) = await both(pair, request(target))
        assert answer.status == status, target
        assert answer.header(b"Content-Type") == b"application/json", target
        if body is not None:
            assert answer.body == body, target
        else:
            error = {"error": f"uid must be 1 to {MAX_UID_LENGTH} characters"}
            assert answer.json() == error, target


async def test_request_ids_and_other_headers_change_nothing(pair: Pair) -> None:
    for headers in (
        "X-Request-ID: bid-42\r\n",
        "X-Request-ID: " + "r" * 100 + "\r\n",
        "Accept: text/html\r\nAccept-Encoding: gzip\r\n",
        "Authorization: Bearer whatever\r\n",  # open lookups ignore keys
    ):
        (answer,) = await both(pair, request("/v1/users/known/segments", headers=headers))
        assert answer.status == 200
        assert answer.body == answered("known", KNOWN)


async def test_other_methods_go_to_the_router(pair: Pair) -> None:
    (head,) = await both(pair, request("/v1/users/known/segments", "HEAD"), head=True)
    assert head.status == 200
    assert head.header(b"Content-Length") == str(len(answered("known", KNOWN))).encode()
    for method in ("POST", "PUT", "DELETE"):
        (refused,) = await both(pair, request("/v1/users/known/segments", method, body=b"{}"))
        assert refused.status == 405
        assert refused.json() == {"error": "Method Not Allowed"}
        assert refused.header(b"Allow") == b"GET,HEAD"


async def test_a_kept_alive_connection_serves_every_request(pair: Pair) -> None:
    keep = "Connection: keep-alive\r\n"
    raw = (
        b"GET /v1/users/known/segments HTTP/1.1\r\nHost: lookup\r\n\r\n"
        + f"GET /v1/users/stranger/segments HTTP/1.1\r\nHost: lookup\r\n{keep}\r\n".encode()
        + b"POST /v1/users/known/segments HTTP/1.1\r\nHost: lookup\r\nContent-Length: 0\r\n\r\n"
        + request("/v1/users/a%20b/segments")
    )
    answers = await both(pair, raw)
    assert [a.status for a in answers] == [200, 200, 405, 200]
    assert answers[3].body == answered("a b", ["geo_socal"])


async def test_keys_grants_and_rate_limits_alike(keyed_pair: Pair) -> None:
    path = "/v1/users/known/segments"

    async def get(key: str | None) -> Answer:
        headers = "" if key is None else f"Authorization: Bearer {key}\r\n"
        (answer,) = await both(keyed_pair, request(path, headers=headers))
        return answer

    assert (await get(None)).status == 401
    assert (await get(ADMIN_KEY)).body == answered("known", KNOWN)
    assert (await get(ACME_KEY)).body == answered("known", ["auto_new_car_intent", "new_car_socal"])
    assert (await get(BETA_KEY)).body == answered("known", ["geo_socal"])
    assert (await get("nobody's key")).status == 401
    limited = await get("nobody's key")  # the second request for one key in a second
    assert limited.status == 429
    assert limited.header(b"Retry-After") == b"1000"


async def test_dispatched_requests_are_timed_under_the_route(pair: Pair) -> None:
    requests = [
        request("/v1/users/known/segments"),
        request("/v1/users/stranger/segments"),
        request("/v1/users/a%20b/segments"),
        request(f"/v1/users/{LONGEST}x/segments"),
        request("/v1/users/a%2Fb/segments"),  # through the router: the same label
        request("/v1/users//segments"),
        request("/v1/users/known/segments", "HEAD"),
    ]
    for raw in requests:
        await both(pair, raw, head=raw.startswith(b"HEAD"))

    async def counts(served: Served) -> dict[tuple[str, str], float]:
        (answer,) = parse(await exchange(served.port, request("/metrics")))
        found: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(answer.body.decode()):
            for sample in family.samples:
                if sample.name == "dmp_lookup_request_duration_seconds_count":
                    found[sample.labels["endpoint"], sample.labels["status"]] = sample.value
        return found

    hot = await counts(pair.hot)
    assert hot == await counts(pair.routed)
    assert hot[SEGMENTS, "200"] == 5  # the router's (HEAD, the encoded slash) included
    assert hot[SEGMENTS, "400"] == 1
    assert hot["unmatched", "404"] == 1


# -- Left to the router: Expect, and percent-encoded targets ---------------------------------


@pytest.mark.parametrize("expect", ["Expect: something-else\r\n", "Expect: 100-continue\r\n"])
async def test_an_expect_header_is_answered_as_the_router_answers(pair: Pair, expect: str) -> None:
    await both(pair, request("/v1/users/known/segments", headers=expect))


async def test_an_encoded_slash_around_the_uid_is_not_the_route(pair: Pair) -> None:
    for target in (
        "/v1/users%2Fknown/segments",
        "/v1/users/known%2Fsegments",
        "/v1%2Fusers%2Fknown%2Fsegments",
    ):
        (answer,) = await both(pair, request(target))
        assert answer.status == 404, target


async def test_an_app_with_a_middleware_is_refused() -> None:
    @web.middleware
    async def tag(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request)

    app = web.Application(middlewares=[tag])
    handler = app.router.add_get("/x", json_ok).handler
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        with pytest.raises(RuntimeError, match="middlewares"):
            serve_first(runner, handler)
    finally:
        await runner.cleanup()


async def json_ok(request: web.Request) -> web.Response:
    return web.json_response({})
