"""Structured logs: JSON lines carrying the request or batch id, level and format from settings."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from dmp.config import Settings
from dmp.logs import JsonFormatter, TextFormatter, log_context
from dmp.lookup import ROUTES, create_lookup_app
from segment_rules import CompiledRules, load_rules_file
from tests.conftest import EXAMPLE_RULES, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """JSON lines of the dmp loggers, formatted as the services format them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dmp")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_time_level_logger_message_and_context(captured: io.StringIO) -> None:
    log = logging.getLogger("dmp.test")
    with log_context(batch_id="t:1:10-19"):
        log.warning("%d events dead-lettered", 2)
    log.info("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second, third = lines(captured)
    assert first["level"] == "WARNING"
    assert first["logger"] == "dmp.test"
    assert first["msg"] == "2 events dead-lettered"
    assert first["batch_id"] == "t:1:10-19"
    assert first["ts"].endswith("+00:00")
    assert "batch_id" not in second
    assert "ValueError: boom" in third["exc"]


def test_text_format_appends_the_context() -> None:
    record = logging.LogRecord("dmp.x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    with log_context(request_id="r-1"):
        text = TextFormatter().format(record)
    assert text.endswith("INFO dmp.x: hello you [request_id=r-1]")


def test_unknown_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="DMP_LOG_FORMAT='xml'"):
        Settings.from_env({"DMP_LOG_FORMAT": "xml"})
    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"DMP_LOG_FORMAT": "TEXT"}).log_format == "text"


async def test_lookup_error_log_carries_the_request_id(
    aiohttp_client: AiohttpClient, captured: io.StringIO
) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("handler bug")

    # A closed port: the replica never loads, which this test does not need.
    settings = Settings.from_env({"DMP_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_lookup_app(settings, CompiledRules(load_rules_file(EXAMPLE_RULES)))
    app[ROUTES].add_get("/broken", broken)
    client = await aiohttp_client(app)

    response = await client.get("/broken", headers={"X-Request-ID": "bid-42"})
    assert response.status == 500
    response = await client.get("/broken")
    assert response.status == 500
    errors = [line for line in lines(captured) if line["msg"].startswith("unhandled error")]
    assert len(errors) == 2
    assert errors[0]["request_id"] == "bid-42"
    # Generated: a random per-process prefix and a counter (no syscall per request).
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9]+", errors[1]["request_id"])
    assert "RuntimeError: handler bug" in errors[0]["exc"]


async def _lookup_stderr(env: dict[str, str], want: str | None, timeout: float = 20.0) -> list[str]:
    """Run the real ``dmp lookup`` command; collect stderr until ``want`` shows (or, with
    None, until its port answers and half a second more), then stop it with SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dmp.cli",
        "lookup",
        cwd=REPO,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    got: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            if want is None:
                await _wait_port(int(env["DMP_LOOKUP_PORT"]))
                await asyncio.sleep(0.5)
            while want is not None and not any(want in line for line in got):
                raw = await proc.stderr.readline()
                assert raw, f"lookup exited early: {got}"
                got.append(raw.decode().rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = await asyncio.wait_for(proc.communicate(), timeout=20)
        got.extend(rest.decode().splitlines())
    assert proc.returncode == 0, got
    return got


async def _wait_port(port: int) -> None:
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMP_", "PROMETHEUS_"))}
    env.update(
        DMP_LOOKUP_PORT=str(free_port()),
        DMP_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: a warning
        DMP_RULES_PATH=str(EXAMPLE_RULES),
        **extra,
    )
    return env


async def test_service_logs_json_by_default_at_the_configured_level() -> None:
    got = await _lookup_stderr(_env(), "snapshot load failed")
    docs = [orjson.loads(line) for line in got]  # every line is one JSON object
    assert any(d["msg"].startswith("lookup listening") and d["level"] == "INFO" for d in docs)
    warning = next(d for d in docs if d["msg"].startswith("snapshot load failed"))
    assert warning["level"] == "WARNING"
    assert warning["logger"] == "dmp.lookup"

    # At ERROR, neither the INFO line nor the warnings are written.
    quiet = await _lookup_stderr(_env(DMP_LOG_LEVEL="error"), None)
    assert quiet == []


async def test_service_text_format() -> None:
    got = await _lookup_stderr(_env(DMP_LOG_FORMAT="text"), "snapshot load failed")
    line = next(line for line in got if "snapshot load failed" in line)
    assert " WARNING dmp.lookup: snapshot load failed" in line
