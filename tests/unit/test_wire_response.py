"""dmp/wire_response.py against aiohttp's own Response: the same bytes on the wire.

Two real servers, one answering with ``web.Response(body=..., content_type=...)`` as the
lookup did, one with ``WireResponse``; raw sockets send each request shape (HTTP/1.1 and
1.0, keep-alive and close, pipelined) and the responses must match byte for byte, the
Date header's value aside, as must whether the server then closed the connection.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiohttp import web

from dmp.wire_response import WireResponse, _DateLine
from tests.ops.test_logs import free_port

BODIES = {
    "/small": orjson.dumps({"uid": "c1", "segments": ["a", "b"]}),
    "/empty": orjson.dumps({"uid": "c\u00e9", "segments": []}),
    "/large": orjson.dumps({"uid": "c2", "segments": [f"s{n:06d}" for n in range(20_000)]}),
}
PIPELINED = b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in BODIES)
PIPELINED_THEN_CLOSE = (
    b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /empty HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
)
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")


def app_answering(make: Callable[[bytes], web.StreamResponse]) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        return make(BODIES[request.path])

    async def closing(request: web.Request) -> web.StreamResponse:
        response = make(BODIES["/small"])
        response.force_close()
        return response

    app = web.Application()
    for path in BODIES:
        app.router.add_get(path, answer)
    app.router.add_get("/closing", closing)
    return app


@pytest.fixture
async def ports() -> AsyncIterator[tuple[int, int]]:
    runners = []
    found = []
    for make in (
        lambda body: web.Response(body=body, content_type="application/json"),
        WireResponse,
    ):
        runner = web.AppRunner(app_answering(make), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        found.append(port)
    try:
        yield found[0], found[1]
    finally:
        for runner in runners:
            await runner.cleanup()


async def exchange(port: int, raw: bytes, responses: int) -> tuple[list[bytes], bool]:
    """Send ``raw``; read ``responses`` responses, then whether the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        got = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            got.append(DATE.sub(b"\r\nDate: -\r\n", head) + body)
        try:
            closed = await asyncio.wait_for(reader.read(1), 0.3) == b""
        except TimeoutError:
            closed = False
        return got, closed
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "responses"),
    [
        (b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        (b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1),
        (b"GET /small HTTP/1.0\r\n\r\n", 1),
        (b"GET /small HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 1),
        (b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        (b"GET /large HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        (b"GET /closing HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        (b"GET /closing HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 1),
        (PIPELINED, 3),
        (PIPELINED_THEN_CLOSE, 2),
    ],
)
async def test_the_same_bytes_as_aiohttps_response(
    ports: tuple[int, int], raw: bytes, responses: int
) -> None:
    reference, wire = ports
    want = await exchange(reference, raw, responses)
    got = await exchange(wire, raw, responses)
    assert got == want
    assert want[0]
    assert all(r.startswith(b"HTTP/1.") for r in want[0])


def test_what_the_request_handler_reads_before_prepare() -> None:
    response = WireResponse(b"{}")
    assert repr(response) == "<WireResponse 200 2 bytes, not prepared>"
    assert response.body_length == 2  # what an access log's %b reads
    assert len(response) == 0
    assert response  # a mapping, but true when empty, as aiohttp's responses are
    assert not response.prepared
    assert response.keep_alive is None
    assert response.status == 200
    assert response.headers.get("X-Anything") is None


def test_the_date_line_changes_with_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    line = _DateLine()
    monkeypatch.setattr("dmp.wire_response.time.time", lambda: 1_700_000_000.2)
    first = line()
    assert first == b"Date: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
    monkeypatch.setattr("dmp.wire_response.time.time", lambda: 1_700_000_000.9)
    assert line() is first
    monkeypatch.setattr("dmp.wire_response.time.time", lambda: 1_700_000_001.0)
    assert line() == b"Date: Tue, 14 Nov 2023 22:13:21 GMT\r\n"


async def test_only_a_get_is_answered() -> None:
    async def head(request: web.Request) -> web.StreamResponse:
        return WireResponse(b"{}")

    app = web.Application()
    app.router.add_route("HEAD", "/x", head)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
        sent = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await runner.cleanup()
    # Refused before a byte is written (aiohttp logs it and closes): never a HEAD with a body.
    assert sent == b""
