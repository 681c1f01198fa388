"""Open-loop (constant arrival rate) HTTP load with HDR histograms, free of coordinated omission.

    python -m loadtests.openloop --port 18080 --rate 4000 --duration 10 [--cookies 10000000]

Request ``i`` is due at ``start + i / rate`` and is sent then, whatever is still in flight
(HTTP/1.1 pipelining over ``--connections`` keep-alive connections, round robin), and its
latency is measured from that *intended* time to the last byte of its answer. A slow server
therefore shows its whole queueing delay instead of slowing the generator down. The
generator's own lateness (actual send - intended) is reported too: when its p99 is not
small, the generator, not the server, was the limit.

Prints one JSON object: counts, and p50/p99/p99.9/max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # hdrhistogram has no types

from loadtests.datagen import cookie_id, zipf_ranks

LOWEST_US = 1
HIGHEST_US = 60_000_000
SPIN_BELOW = 0.002  # seconds: closer than this to a send, spin instead of sleeping
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


class _Connection(asyncio.Protocol):
    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.buffer = bytearray()
        self.pending: deque[float] = deque()  # intended send times, in order
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, request: bytes, intended: float) -> None:
        assert self.transport is not None
        self.pending.append(intended)
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buffer
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            at = buf.find(b"Content-Length: ", 0, end)
            if at < 0:
                at = buf.lower().find(b"content-length: ", 0, end)
            length = int(buf[at + 16 : buf.find(b"\r\n", at)]) if at >= 0 else 0
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(buf[9:12])
            del buf[:total]
            self.recorder.record(now, self.pending.popleft(), status)


class _Recorder:
    def __init__(self, record_after: float) -> None:
        self.latency = HdrHistogram(LOWEST_US, HIGHEST_US, 3)
        self.send_lag = HdrHistogram(LOWEST_US, HIGHEST_US, 3)
        self.record_after = record_after
        self.answered = 0
        self.errors = 0

    def record(self, now: float, intended: float, status: int) -> None:
        if status != 200:
            self.errors += 1
        if intended < self.record_after:
            return  # warm-up
        self.answered += 1
        self.latency.record_value(max(LOWEST_US, int((now - intended) * 1e6)))


def _summary(hist: Any) -> dict[str, float]:
    out = {f"p{p:g}_ms": hist.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["max_ms"] = hist.get_max_value() / 1000
    out["mean_ms"] = hist.get_mean_value() / 1000
    return out


async def run(
    host: str,
    port: int,
    rate: float,
    duration: float,
    requests: Sequence[bytes],
    *,
    connections: int = 64,
    warmup: float = 1.0,
    drain_timeout: float = 10.0,
) -> dict[str, Any]:
    """Send ``rate * (warmup + duration)`` requests on schedule; latencies after ``warmup``."""
    loop = asyncio.get_running_loop()
    conns: list[_Connection] = []
    start = time.perf_counter() + 0.2
    recorder = _Recorder(start + warmup)
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _Connection(recorder), host, port)
        conns.append(proto)
    total = int(rate * (warmup + duration))
    warm = int(rate * warmup)
    interval = 1.0 / rate
    for i in range(total):
        intended = start + i * interval
        delay = intended - time.perf_counter()
        if delay > SPIN_BELOW:
            await asyncio.sleep(delay - SPIN_BELOW / 2)
        # Spin (still reading answers): epoll's millisecond timeouts would send late.
        while time.perf_counter() < intended:  # noqa: ASYNC110
            await asyncio.sleep(0)
        conn = conns[i % connections]
        if conn.closed:
            recorder.errors += 1
            continue
        conn.send(requests[i % len(requests)], intended)
        if i >= warm:
            lag = time.perf_counter() - intended
            recorder.send_lag.record_value(max(LOWEST_US, int(lag * 1e6)))
    deadline = time.perf_counter() + drain_timeout
    while any(c.pending and not c.closed for c in conns) and time.perf_counter() < deadline:  # noqa: ASYNC110  # answers end it, no event to wait on
        await asyncio.sleep(0.01)
    unanswered = sum(len(c.pending) for c in conns)
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    elapsed = time.perf_counter() - start
    return {
        "rate": rate,
        "duration_s": duration,
        "sent": total - warm,
        "answered": recorder.answered,
        "errors": recorder.errors,
        "unanswered": unanswered,
        "elapsed_s": round(elapsed, 3),
        "latency": _summary(recorder.latency),
        "send_lag": _summary(recorder.send_lag),
    }


def lookup_requests(cookies: int, count: int, seed: int, host: str = "127.0.0.1") -> list[bytes]:
    ranks = zipf_ranks(np.random.default_rng(seed), cookies, count)
    return [
        f"GET /v1/users/{cookie_id(int(r))}/segments HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        for r in ranks
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    count = min(int(args.rate * (args.duration + args.warmup)) + 1, 500_000)
    requests = lookup_requests(args.cookies, count, args.seed, args.host)
    result = asyncio.run(
        run(
            args.host,
            args.port,
            args.rate,
            args.duration,
            requests,
            connections=args.connections,
            warmup=args.warmup,
        )
    )
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
