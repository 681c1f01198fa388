"""Where export batches go: an HTTP endpoint (one POST per batch) or files (one per batch).

Both carry the batch number so a receiver can drop a batch it already has: the HTTP sink
sends it as `Idempotency-Key` (and `X-Dmp-Batch`), the file sink names the file after it
and writes by rename, so a resent batch replaces its own file with the same bytes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp

from bidder_adapter.destination_config import DestinationConfig
from dmp.destinations import Batch, Sink

NDJSON = "application/x-ndjson"


class SinkError(Exception):
    """A delivery that did not (certainly) arrive; the exporter retries it."""


class HttpSink:
    """POSTs each batch as NDJSON; any 2xx is delivered, anything else is retried."""

    def __init__(self, config: DestinationConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)

    async def send(self, partner_id: str, batch: Batch) -> None:
        headers = {
            **self.config.headers,
            "Content-Type": NDJSON,
            "Idempotency-Key": f"{partner_id}-{batch.seq}",
            "X-Dmp-Destination": partner_id,
            "X-Dmp-Batch": str(batch.seq),
        }
        try:
            async with self.session.post(
                self.config.url, data=batch.body, headers=headers, timeout=self.timeout
            ) as response:
                await response.read()
                if not 200 <= response.status < 300:
                    raise SinkError(f"HTTP {response.status} from {self.config.url}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}") from exc


class FileSink:
    """Writes `<path>/<partner>-<batch:012d>.jsonl` (one line per user) atomically."""

    def __init__(self, config: DestinationConfig) -> None:
        self.folder = Path(config.path)

    def file_for(self, partner_id: str, seq: int) -> Path:
        return self.folder / f"{partner_id}-{seq:012d}.jsonl"

    async def send(self, partner_id: str, batch: Batch) -> None:
        try:
            await asyncio.to_thread(self._write, self.file_for(partner_id, batch.seq), batch.body)
        except OSError as exc:
            raise SinkError(f"{type(exc).__name__}: {exc}") from exc

    def _write(self, target: Path, body: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        # The rename is durable only once the folder itself is synced.
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_sink(config: DestinationConfig, session: aiohttp.ClientSession) -> Sink:
    if config.kind == "http":
        return HttpSink(config, session)
    return FileSink(config)
