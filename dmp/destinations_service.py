"""`dmp destinations`: one exporter per partner with a destination, following the partner file."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bidder_adapter.partner_metrics import PartnerMetrics
from bidder_adapter.partner_registry import PartnerRegistry
from bidder_adapter.profiles import PartnerProfile
from dmp.config import Settings
from dmp.destinations import DestinationMetrics, Exporter
from dmp.destinations_sinks import make_sink
from dmp.redis_client import REDIS_FAILURES, connect
from dmp.rule_versions import RuleVersions, RuleWatcher
from segment_rules import CompiledRules

log = logging.getLogger(__name__)
STOP_GRACE_SECONDS = 10.0
RESTART_BACKOFF_MAX = 30.0


class _Running:
    def __init__(self, profile: PartnerProfile, stop: asyncio.Event, task: asyncio.Task[None]):
        self.profile = profile
        self.stop = stop
        self.task = task


class DestinationService:
    def __init__(
        self,
        settings: Settings,
        rules: CompiledRules,
        client: aioredis.Redis,
        partners: PartnerRegistry,
        metrics: DestinationMetrics,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.rules = rules
        self.client = client
        self.partners = partners
        self.metrics = metrics
        self.session = session
        self.running: dict[str, _Running] = {}
        self.exporters: dict[str, Exporter] = {}  # partner -> its exporter while it runs
        # The applied rule version wins over the file: a segment paused by a version must
        # stay hidden from partners, and goes out once a version makes it active.
        self.watcher = RuleWatcher(
            RuleVersions(client, settings.redis.key_prefix), rules, self.set_rules
        )
        # Exporters start once the version in force is known: started under the file's
        # statuses, each would switch its live set twice (dmp/destinations_switch.py),
        # sending a paused segment's members and then taking them back.
        self.rules_known = False

    def set_rules(self, rules: CompiledRules, number: int | None = None) -> None:
        self.rules = rules
        for exporter in self.exporters.values():
            exporter.set_rules(rules)

    def exporter_for(self, profile: PartnerProfile) -> Exporter:
        assert profile.destination is not None
        return Exporter(
            self.client,
            profile,
            self.rules,
            make_sink(profile.destination, self.session),
            self.metrics,
            prefix=self.settings.redis.key_prefix,
            state_prefix=self.settings.partner.destination_state_prefix,
            topic=self.settings.kafka.topic,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one exporter per destination in the partner file in force, until `stop`."""
        try:
            while not stop.is_set():
                await self._poll_rules()
                if self.rules_known:
                    await self._reconcile()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        stop.wait(), timeout=self.settings.partner.reload_poll_seconds
                    )
                self.partners.poll()
        finally:
            await self._stop_all(list(self.running))

    async def _poll_rules(self) -> None:
        try:
            await self.watcher.poll()
        except REDIS_FAILURES as exc:  # keep exporting under the version in force; retry later
            log.warning("rule version check failed (%s)", exc)
            return
        self.rules_known = True

    async def _reconcile(self) -> None:
        wanted = {
            pid: p for pid, p in self.partners.current.profiles.items() if p.destination is not None
        }
        gone = [pid for pid, r in self.running.items() if wanted.get(pid) != r.profile]
        await self._stop_all(gone)
        for pid, profile in wanted.items():
            if pid not in self.running:
                stop = asyncio.Event()
                task = asyncio.create_task(self._supervise(profile, stop), name=f"export-{pid}")
                self.running[pid] = _Running(profile, stop, task)
                log.info("destination %s started (%s)", pid, profile.destination)

    async def _supervise(self, profile: PartnerProfile, stop: asyncio.Event) -> None:
        """Run the exporter; if it fails (Redis gone...), start it again after a backoff."""
        backoff = 0.5
        while not stop.is_set():
            exporter = self.exporters[profile.partner_id] = self.exporter_for(profile)
            try:
                await exporter.run(stop)
                return
            except Exception:
                log.exception(
                    "destination %s failed; restarting in %.1fs", profile.partner_id, backoff
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            finally:
                if self.exporters.get(profile.partner_id) is exporter:
                    del self.exporters[profile.partner_id]

    async def _stop_all(self, partner_ids: list[str]) -> None:
        stopping = [self.running.pop(pid) for pid in partner_ids]
        for r in stopping:
            r.stop.set()
        tasks = [r.task for r in stopping]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        for task in pending:
            task.cancel("destination did not stop in time")
        if pending:
            await asyncio.wait(pending)


async def serve_destinations(settings: Settings, rules: CompiledRules) -> None:
    """Run the exporters until SIGINT/SIGTERM (signal handlers only here, removed after)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    registry = CollectorRegistry()
    partners = PartnerRegistry(
        settings.partners_path,
        PartnerMetrics.create(registry),
        known_segments=[s.id for s in rules.ruleset.segments],
    )
    partners.load()
    client = connect(settings.redis)
    runner: web.AppRunner | None = None
    try:
        async with aiohttp.ClientSession() as session:
            if settings.partner.destinations_metrics_port:
                runner = await _serve_metrics(registry, settings)
            service = DestinationService(
                settings, rules, client, partners, DestinationMetrics.create(registry), session
            )
            await service.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await client.aclose()
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _serve_metrics(registry: CollectorRegistry, settings: Settings) -> web.AppRunner:
    async def endpoint(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", endpoint)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(
        runner, settings.lookup.host, settings.partner.destinations_metrics_port
    ).start()
    return runner
