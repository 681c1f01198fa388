"""The ingest test's baseline: aiokafka consuming and orjson-decoding events, doing nothing else.

    python -m loadtests.ingest_baseline --bootstrap HOST:PORT --topic T --events N

Same consumer settings as ``dmp ingest`` (a consumer group, no auto commit, the same fetch
sizes and ``getmany`` batch size). Prints JSON: events/s from the first record to the N-th.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from dmp.config import KafkaSettings


async def consume(bootstrap: str, topic: str, events: int, limit_s: float) -> dict[str, Any]:
    k = KafkaSettings()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"lt-baseline-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=k.fetch_max_bytes,
        max_partition_fetch_bytes=k.fetch_max_bytes,
    )
    await consumer.start()
    opened = time.perf_counter()
    seen = 0
    first = 0.0
    first_count = 0
    deadline = time.monotonic() + limit_s
    loads = orjson.loads
    try:
        while seen < events and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=k.poll_timeout_ms, max_records=k.max_batch)
            for records in batches.values():
                for rec in records:
                    loads(rec.value)
                seen += len(records)
            if batches and not first:
                # Timed from the end of the first batch, as ingest is from its first commit.
                first, first_count = time.perf_counter(), seen
        last = time.perf_counter()
    finally:
        await consumer.stop()
    seconds = last - first if first else float("nan")
    timed = seen - first_count
    if not timed:  # everything came in the first batch (tiny runs): time from the start
        timed, seconds = seen, last - opened
    rate = timed / seconds if seconds > 0 else 0.0
    return {"events": seen, "timed_events": timed, "seconds": seconds, "events_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    result = asyncio.run(consume(args.bootstrap, args.topic, args.events, args.timeout))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
