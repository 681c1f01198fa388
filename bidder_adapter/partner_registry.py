"""The partner configuration in force, replaced whole when the file changes.

Readers take `registry.current` once and use that object to the end of their request: a
new version is built and validated beside it and then swapped in with one assignment, so no
request ever sees half of one version and half of another. A bad file is refused whole
(file:line:column in the log and in the admin answer) and the running version stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from bidder_adapter.partner_file import (
    PartnerConfig,
    PartnerFileError,
    empty_config,
    load_partner_file,
)
from bidder_adapter.partner_metrics import PartnerMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    config: PartnerConfig
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


class PartnerRegistry:
    def __init__(
        self,
        path: Path | None,
        metrics: PartnerMetrics,
        known_segments: Collection[str] = (),
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.known_segments = frozenset(known_segments)
        self.current: PartnerConfig = empty_config()
        self._seen: tuple[int, int, int] | None = None

    def load(self) -> PartnerConfig:
        """First load: a bad file raises PartnerFileError (the service must not start)."""
        if self.path is None:
            return self.current
        self._seen = self._stat()
        self._install(load_partner_file(self.path))
        return self.current

    def reload(self) -> ReloadResult:
        """Read the file again; install it if it changed and is valid, else keep the current."""
        if self.path is None:
            return ReloadResult(False, self.current)
        self._seen = self._stat()
        try:
            config = load_partner_file(self.path)
        except PartnerFileError as exc:
            self.metrics.config_reloads.labels("error").inc()
            for error in exc.errors:
                log.error(
                    "partner file refused, keeping version %s: %s",
                    self.current.short_version,
                    error,
                )
            return ReloadResult(False, self.current, tuple(str(e) for e in exc.errors))
        if config.version == self.current.version:
            self.metrics.config_reloads.labels("unchanged").inc()
            return ReloadResult(False, self.current)
        self._install(config)
        self.metrics.config_reloads.labels("ok").inc()
        return ReloadResult(True, config)

    def _install(self, config: PartnerConfig) -> None:
        if self.known_segments:
            for profile in config.profiles.values():
                unknown = sorted(profile.granted_segments - self.known_segments)
                if unknown:
                    log.warning(
                        "partner %s is granted segments the rules do not define: %s",
                        profile.partner_id,
                        ", ".join(unknown),
                    )
        self.current = config  # the one assignment readers can observe
        self.metrics.config_partners.set(len(config.profiles))
        self.metrics.config_info.clear()  # only the version in force is reported
        self.metrics.config_info.labels(config.short_version).set(1)
        log.info(
            "partner config %s in force: %d partners", config.short_version, len(config.profiles)
        )

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> ReloadResult | None:
        """Reload if the file's stat changed since it was last read; None when it did not."""
        if self.path is None or self._stat() == self._seen:
            return None
        return self.reload()

    async def watch(self, stop: asyncio.Event, interval: float) -> None:
        """Poll the file's stat (mtime, size, inode: editors often replace by rename)."""
        if self.path is None:
            return
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            self.poll()
