"""The bid-time answer as one HTTP response written in one piece (docs/decisions/0013).

aiohttp's ``Response`` builds a header multidict per request, fills it in ``prepare``
(keep-alive by HTTP version, Date, Server, Content-Length) and serialises it through its
stream writer: about a fifth of a lookup's CPU, as much as the answer itself. A lookup's
response is always the same shape, a 200 with a JSON body, so ``WireResponse`` writes the
status line, the headers aiohttp would send, in aiohttp's order, and the body in one
``transport.write``. The rules it follows are aiohttp's ``StreamResponse._prepare_headers``
for this case; tests/unit/test_wire_response.py holds the bytes equal to aiohttp's for
HTTP/1.0 and 1.1, keep-alive and close.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy

_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()


class _DateLine:
    """``Date: ...\\r\\n`` for the current second, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self._line


_date_line = _DateLine()


class WireResponse(web.StreamResponse):
    """A 200 ``application/json`` response to a GET; ``prepare`` sends all of it.

    Only what aiohttp's request handler and dmp.observed_routes read is kept: ``status``,
    ``headers`` (none to read), ``keep_alive`` once prepared, ``body_length`` (access
    logs), ``force_close``. It runs no ``on_response_prepare`` signals: the lookup app
    refuses them at start-up (dmp.lookup), as ``serve_first`` does.
    """

    def __init__(self, body: bytes) -> None:
        # Not super().__init__(): its headers and writer state are what this skips. The
        # mapping's storage is kept, so the response stays usable as the mapping it is.
        self._state = {}
        self._wire_body = body
        self._wire_keep_alive: bool | None = None
        self._wire_close = False
        self._body_length = len(body)

    def __repr__(self) -> str:
        info = "sent" if self.prepared else "not prepared"
        return f"<WireResponse 200 {len(self._wire_body)} bytes, {info}>"

    @property
    def status(self) -> int:
        return 200

    @property
    def headers(self) -> CIMultiDictProxy[str]:  # type: ignore[override]
        return _NO_HEADERS

    @property
    def keep_alive(self) -> bool | None:
        return self._wire_keep_alive

    @property
    def prepared(self) -> bool:
        return self._wire_keep_alive is not None

    def force_close(self) -> None:
        self._wire_close = True

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._wire_keep_alive is not None:
            return
        if request.method != "GET":  # a HEAD has no body: aiohttp's Response knows the rules
            raise RuntimeError(f"WireResponse answers GET requests, not {request.method}")
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        keep_alive = request.keep_alive and not self._wire_close
        self._wire_keep_alive = keep_alive
        version = request.version
        body = self._wire_body
        if version == HttpVersion11:
            connection = b"" if keep_alive else b"Connection: close\r\n"
            status = b"HTTP/1.1 200 OK\r\n"
        else:
            connection = (
                b"Connection: keep-alive\r\n" if keep_alive and version == HttpVersion10 else b""
            )
            status = f"HTTP/{version.major}.{version.minor} 200 OK\r\n".encode()
        transport.write(
            b"".join(
                (
                    status,
                    b"Content-Type: application/json\r\nContent-Length: ",
                    str(len(body)).encode(),
                    b"\r\n",
                    _date_line(),
                    _SERVER,
                    connection,
                    b"\r\n",
                    body,
                )
            )
        )
        # Over the transport's high-water mark (a slow reader): wait, as aiohttp's writer does.
        if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
            await request.writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        """Nothing is left to send: ``prepare`` wrote the whole response."""
