"""Run the long-lived services until a signal: signal handlers live only here."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time

from aiohttp import web

from dmp.config import Settings
from dmp.hot_route import serve_first
from dmp.ingest import IngestService
from dmp.limits import PARSER_LIMITS
from dmp.lookup import HOT_ROUTE, create_lookup_app
from dmp.metrics import CONTENT_TYPE, IngestMetrics, mark_worker_dead, prepare_multiproc_dir
from dmp.redis_client import connect
from segment_rules import CompiledRules

log = logging.getLogger(__name__)


def _install_signals(stop: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
        installed.append(sig)
    return installed


def _remove_signals(installed: list[signal.Signals]) -> None:
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)


async def serve_ingest(settings: Settings, rules: CompiledRules) -> None:
    stop = asyncio.Event()
    installed = _install_signals(stop)
    if settings.prometheus_multiproc_dir is not None:
        prepare_multiproc_dir(settings.prometheus_multiproc_dir)
    metrics = IngestMetrics.create(multiproc_dir=settings.prometheus_multiproc_dir)
    client = connect(settings.redis)
    runner: web.AppRunner | None = None
    try:
        if settings.ingest.metrics_port:
            runner = await _serve_metrics(
                metrics, settings.lookup.host, settings.ingest.metrics_port
            )
        service = IngestService(settings, rules, client, metrics)
        log.info("ingest consuming %s as group %s", settings.kafka.topic, settings.kafka.group_id)
        await service.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await client.aclose()
        _remove_signals(installed)


async def _serve_metrics(metrics: IngestMetrics, host: str, port: int) -> web.AppRunner:
    async def endpoint(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_lookup(settings: Settings, rules: CompiledRules, *, worker: bool = False) -> None:
    """Serve until a signal; ``worker``: one of ``run_lookup_workers``' processes."""
    stop = asyncio.Event()
    installed = _install_signals(stop)
    if settings.prometheus_multiproc_dir is not None and not worker:
        # With workers the supervisor does this once, before they start.
        prepare_multiproc_dir(settings.prometheus_multiproc_dir)
    # Header lines up to PARSER_LIMITS reach dmp.limits, whose refusal is a JSON 431.
    runner = web.AppRunner(
        create_lookup_app(settings, rules),
        access_log=None,
        max_line_size=PARSER_LIMITS["max_line_size"],
        max_field_size=PARSER_LIMITS["max_field_size"],
    )
    try:
        await runner.setup()
        # The bid-time route before the router (dmp/hot_route.py, docs/decisions/0012).
        serve_first(runner, runner.app[HOT_ROUTE])
        site = web.TCPSite(
            runner, settings.lookup.host, settings.lookup.port, reuse_port=worker or None
        )
        await site.start()
        log.info("lookup listening on http://%s:%d", settings.lookup.host, settings.lookup.port)
        await stop.wait()
        log.info("lookup stopping")
    finally:
        await runner.cleanup()
        _remove_signals(installed)


def run_lookup_workers(settings: Settings, workers: int) -> int:
    """``workers`` lookup processes on one port (SO_REUSEPORT: the kernel spreads connections).

    Each is a whole replica (stateless, loaded from Redis). Metrics stay whole through
    PROMETHEUS_MULTIPROC_DIR, required here. SIGTERM/SIGINT are passed on; when one worker
    exits, the others are stopped too and the exit status says so.
    """
    folder = settings.prometheus_multiproc_dir
    if folder is None:
        log.error("--workers needs PROMETHEUS_MULTIPROC_DIR, or each scrape sees one worker")
        return 2
    prepare_multiproc_dir(folder)
    argv = [sys.executable, "-m", "dmp.cli", "--rules", str(settings.rules_path)]
    procs = [subprocess.Popen([*argv, "lookup", "--worker"]) for _ in range(workers)]
    log.info("lookup: %d workers (pids %s)", workers, ", ".join(str(p.pid) for p in procs))
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        running = list(procs)
        while running:
            for proc in list(running):
                if proc.poll() is None:
                    continue
                running.remove(proc)
                mark_worker_dead(folder, proc.pid)
                if not stopping:
                    log.error("lookup worker %d exited (%s); stopping", proc.pid, proc.returncode)
                    failed = True
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if failed else 0
