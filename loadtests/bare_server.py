"""The lookup test's baseline: a bare aiohttp handler answering a constant JSON body.

    python -m loadtests.bare_server --port 18090

Same process model as ``dmp lookup`` (one process, ``web.AppRunner`` + ``TCPSite``, no
access log), the same route shape and a body of the size a typical answer has, so the
ratio ours / bare is what our handler, middleware and replica cost on top of aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import orjson
from aiohttp import web

BODY = orjson.dumps({"uid": "c12345", "segments": [f"seg_{n:04d}" for n in range(0, 400, 20)]})


async def segments(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ready"}', content_type="application/json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/users/{uid}/segments", segments)
    app.router.add_get("/readyz", ready)
    return app


async def serve(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18090)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
