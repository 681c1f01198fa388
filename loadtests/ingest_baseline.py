"""The ingest test's baseline: aiokafka consuming and orjson-decoding events, doing nothing else.

    python -m loadtests.ingest_baseline --bootstrap HOST:PORT --topic T --events N
        [--write-floor REDIS_URL [--state-bytes B] [--floor-store keys|hash|log]]

Same consumer settings as ``dmp ingest`` (a consumer group, no auto commit, the same fetch
sizes and ``getmany`` batch size). Prints JSON: events/s from the first record to the N-th.

``--write-floor`` also writes, per partition batch, what every ingest batch writes however
few segments change, in the same transaction shape as ``PartitionStore`` (docs/decisions/
0018): WATCH and GET the offset, then one state of B bytes (with its TTL) and one due time
per distinct cookie, and the new offset. No rule work, no validation: a ceiling for ingest
with Redis as it is, not a budget's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from dmp.config import KafkaSettings
from dmp.keys import PartitionKeys
from dmp.partition_store import SET_STATES
from dmp.redis_client import scan_batches

FloorStore = Literal["keys", "hash", "log"]
STATE_TTL = 91 * 86400  # the default retention (90 days) + a day, as ingest sets it
DUE_IN = 3600.0  # seconds: any time works, a float per cookie is what matters


class WriteFloor:
    """One Redis transaction per partition batch, shaped like PartitionStore.commit's."""

    def __init__(
        self, client: aioredis.Redis, topic: str, state_bytes: int, store: FloorStore = "keys"
    ) -> None:
        self.client = client
        self.prefix = f"lt-floor-{uuid.uuid4().hex[:8]}"
        self.topic = topic
        self.state = b"s" * state_bytes
        # "keys": a key per cookie with its TTL, as ingest stores states. "hash": every
        # state of a partition in one hash (one HSET a batch, no TTL: Redis 7.0 has no
        # per-field expiry), for comparison (docs/decisions/0018). "log": the batch's
        # states (id, then state) appended to one value per partition in one APPEND.
        self.store = store

    async def write(self, tp: TopicPartition, uids: set[str], next_offset: int) -> None:
        keys = PartitionKeys(self.prefix, self.topic, tp.partition)
        due = time.time() + DUE_IN
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(keys.offset)
            await pipe.get(keys.offset)
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves multi() untyped
            if self.store == "hash":
                pipe.hset(f"{keys.tag}:states", mapping=dict.fromkeys(uids, self.state))
            elif self.store == "log":
                pipe.append(
                    f"{keys.tag}:state-log",
                    b"".join(u.encode() + b"\0" + self.state for u in uids),
                )
            else:
                pipe.eval(
                    SET_STATES,
                    len(uids),
                    *[keys.cookie(u) for u in uids],
                    STATE_TTL,
                    *[self.state] * len(uids),
                )
            pipe.zadd(keys.due, dict.fromkeys(uids, due))
            pipe.set(keys.offset, next_offset)
            await pipe.execute()

    async def server_cpu(self) -> float:
        """Redis's own CPU seconds so far (INFO cpu): what the writes cost the server, plus
        whatever else that Redis did meanwhile (use one no other test is using)."""
        info = await self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def delete(self) -> None:
        async for batch in scan_batches(self.client, f"{self.prefix}:*", 10_000):
            await self.client.unlink(*batch)


async def consume(
    bootstrap: str, topic: str, events: int, limit_s: float, floor: WriteFloor | None = None
) -> dict[str, Any]:
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
    server_cpu = await floor.server_cpu() if floor is not None else 0.0
    try:
        while seen < events and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=k.poll_timeout_ms, max_records=k.max_batch)
            for tp, records in batches.items():
                if floor is None:
                    for rec in records:
                        loads(rec.value)
                else:
                    uids = {loads(rec.value)["uid"] for rec in records}
                    await floor.write(tp, uids, records[-1].offset + 1)
                seen += len(records)
            if batches and not first:
                # Timed from the end of the first batch, as ingest is from its first commit.
                first, first_count = time.perf_counter(), seen
        last = time.perf_counter()
        if floor is not None:
            server_cpu = await floor.server_cpu() - server_cpu
    finally:
        await consumer.stop()
    seconds = last - first if first else float("nan")
    timed = seen - first_count
    if not timed:  # everything came in the first batch (tiny runs): time from the start
        timed, seconds = seen, last - opened
    rate = timed / seconds if seconds > 0 else 0.0
    result = {"events": seen, "timed_events": timed, "seconds": seconds, "events_per_s": rate}
    if floor is not None and seen:
        # Every event's share, the untimed first batch included (so is the server's work).
        result["redis_cpu_us_per_event"] = server_cpu / seen * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--write-floor", metavar="REDIS_URL", help="also write (see above)")
    parser.add_argument("--state-bytes", type=int, default=400, help="each state's size")
    parser.add_argument(
        "--floor-store", choices=["keys", "hash", "log"], default="keys", help="where states go"
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(orjson.dumps(result).decode())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.write_floor is None:
        return await consume(args.bootstrap, args.topic, args.events, args.timeout)
    client = aioredis.Redis.from_url(args.write_floor)
    floor = WriteFloor(client, args.topic, args.state_bytes, args.floor_store)
    try:
        return await consume(args.bootstrap, args.topic, args.events, args.timeout, floor)
    finally:
        await floor.delete()
        await client.aclose()


if __name__ == "__main__":
    main()
