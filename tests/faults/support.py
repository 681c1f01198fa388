"""What the fault tests share: private services, `dmp ingest` as a process, state snapshots.

Services that a test restarts are private: their own DMP_STATE_DIR and ports, started and
stopped through the same deploy/ scripts as everything else, so restarting them never
touches the shared Redis and Kafka that other tests use.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition
from pyroaring import BitMap

from dmp.config import Settings
from dmp.keys import PartitionKeys
from dmp.redis_types import as_bytes, as_str
from tests.conftest import REPO

FAULT_RULES = Path(__file__).with_name("rules.yaml")
DAY = 86400.0
# Keys that legitimately differ between two runs over the same events: the change stream
# (entries are cut per batch and stamped with wall-clock times) and replica snapshots.
VOLATILE_SUFFIXES = (":changes", ":snapshot", ":snapshot-lock")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def deploy(script: str, action: str, env: Mapping[str, str], timeout: float = 120) -> None:
    """Run deploy/<script>.sh <action>; its log goes to the test's output on failure."""
    done = subprocess.run(
        [str(REPO / "deploy" / f"{script}.sh"), action],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"deploy/{script}.sh {action} failed:\n{done.stderr[-4000:]}")


@dataclass
class PrivateRedis:
    state_dir: Path
    password: str = ""
    port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DMP_STATE_DIR": str(self.state_dir),
            "DMP_REDIS_PORT": str(self.port),
            "DMP_REDIS_PASSWORD": self.password,
        }

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        deploy("redis", "start", self.env)

    def stop(self) -> None:
        deploy("redis", "stop", self.env)


@dataclass
class PrivateKafka:
    state_dir: Path
    sasl_users: str = ""  # "user:password,..." adds a SASL/PLAIN listener
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    sasl_port: int = field(default_factory=free_port)

    @property
    def env(self) -> dict[str, str]:
        return {
            "DMP_STATE_DIR": str(self.state_dir),
            "DMP_KAFKA_PORT": str(self.port),
            "DMP_KAFKA_CONTROLLER_PORT": str(self.controller_port),
            "DMP_KAFKA_SASL_PORT": str(self.sasl_port),
            "DMP_KAFKA_SASL_USERS": self.sasl_users,
            "DMP_KAFKA_HEAP": "512m",
        }

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        deploy("kafka", "start", self.env)

    def stop(self) -> None:
        deploy("kafka", "stop", self.env)


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a `dmp` process that uses exactly these settings' topic and keys."""
    k, r = settings.kafka, settings.redis
    env = {
        **os.environ,
        "DMP_KAFKA_BOOTSTRAP": k.bootstrap,
        "DMP_KAFKA_TOPIC": k.topic,
        "DMP_KAFKA_DEAD_LETTER_TOPIC": k.dead_letter_topic,
        "DMP_KAFKA_GROUP_ID": k.group_id,
        "DMP_KAFKA_PARTITIONS": str(k.partitions),
        "DMP_KAFKA_SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "DMP_KAFKA_HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "DMP_KAFKA_MAX_BATCH": str(k.max_batch),
        "DMP_REDIS_URL": r.url,
        "DMP_REDIS_KEY_PREFIX": r.key_prefix,
        "DMP_REDIS_CHANGE_STREAM_MAXLEN": str(r.change_stream_maxlen),
        "DMP_RULES_PATH": str(settings.rules_path),
        "DMP_LOG_FORMAT": "text",
        "DMP_LOG_LEVEL": "INFO",
        "DMP_LOOKUP_PORT": str(settings.lookup.port),
        "DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS": str(settings.lookup.snapshot_interval_seconds),
    }
    env.update(extra)
    return env


class Process:
    """A `dmp` command run as a child process, as production runs it."""

    def __init__(self, command: str, env: Mapping[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dmp.cli", command],
            env=dict(env),
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"process {self.proc.pid} still running after {timeout}s")
            await asyncio.sleep(0.02)
        self._log.close()
        return self.proc.returncode

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait(10)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


async def create_topic(settings: Settings) -> None:
    from dmp.topics import create_topics

    await create_topics(settings.kafka)


async def delete_keys(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])


def stream_events(count: int, cookies: int, seed: int, now: float) -> Iterator[dict[str, Any]]:
    """Events that each match at least one trait of tests/faults/rules.yaml, a few days old."""
    rng = random.Random(seed)
    kinds = (
        ("page_view", ["auto/new-cars", "auto/new-cars/suv"]),
        ("page_view", ["sports/football"]),
        ("video_view", ["sports/tennis", "travel/"]),
        ("search", ["travel/flights"]),
        ("click", ["auto/new-cars/sedan"]),
    )
    geos = (
        {"country": "USA", "region": "CA", "metro": "803"},
        {"country": "USA", "region": "CA", "metro": "807"},
        {"country": "USA", "region": "NY", "metro": "501"},
    )
    for n in range(count):
        uid = f"c{rng.randrange(cookies):07d}"
        kind, categories = rng.choice(kinds)
        event: dict[str, Any] = {
            "uid": uid,
            "ts": round(now - rng.uniform(0.0, 3 * DAY), 3),
            "type": kind,
            "categories": categories,
            "geo": rng.choice(geos),
            "url": f"https://www.shop.example/electric/{n}",
        }
        if n % 7 == 0:
            event["attrs"] = {"order_value": rng.randrange(500), "query": "used phev"}
        yield event


async def produce(
    bootstrap: str,
    topic: str,
    events: list[dict[str, Any]],
    *,
    chunk: int = 2000,
    pause: float = 0.0,
) -> None:
    """Send every event (key = uid), `chunk` at a time, each chunk acknowledged.

    Idempotent, so a retried send on a busy machine cannot write an event twice: the tests
    compare state with a clean run's and count records as events (topic_records)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, enable_idempotence=True
    )
    await producer.start()
    try:
        for i in range(0, len(events), chunk):
            futures = [
                await producer.send(topic, orjson.dumps(e), key=e["uid"].encode())
                for e in events[i : i + chunk]
            ]
            await asyncio.gather(*futures)
            if pause:
                await asyncio.sleep(pause)
    finally:
        await producer.stop()


async def stored_offsets(client: aioredis.Redis, settings: Settings) -> dict[int, int]:
    k = settings.kafka
    keys = [
        PartitionKeys(settings.redis.key_prefix, k.topic, p).offset for p in range(k.partitions)
    ]
    raws = await client.mget(keys)
    return {p: int(raw) if raw is not None else 0 for p, raw in enumerate(raws)}


async def topic_records(settings: Settings) -> int:
    """How many records the topic holds (end offsets summed; nothing is ever deleted)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.kafka.topic, p) for p in range(settings.kafka.partitions)]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


def as_committed(offsets: dict[int, int]) -> dict[int, int]:
    """Offsets Redis holds, as Kafka reports them once committed (-1: nothing committed)."""
    return {p: o if o else -1 for p, o in offsets.items()}


async def wait_applied(
    client: aioredis.Redis, settings: Settings, total: int, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while sum((await stored_offsets(client, settings)).values()) < total:
        if time.monotonic() > deadline:
            got = await stored_offsets(client, settings)
            raise AssertionError(f"offsets {got} never reached {total} in {timeout}s")
        await asyncio.sleep(0.05)


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait until `predicate()` (sync or async) is true."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """The ingest group's offsets as Kafka holds them (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        raw = await admin.list_consumer_group_offsets(settings.kafka.group_id)
    finally:
        await admin.close()
    out = dict.fromkeys(range(settings.kafka.partitions), -1)
    for tp, meta in raw.items():
        if isinstance(tp, TopicPartition) and tp.topic == settings.kafka.topic:
            out[tp.partition] = meta.offset
    return out


async def state_snapshot(client: aioredis.Redis, prefix: str) -> dict[str, object]:
    """Every key a run wrote under `prefix`, named without the prefix, with its value.

    Bitmap chunks, cookie states, id arrays, offsets, next positions, due times: all of it,
    except the change stream and snapshots (see VOLATILE_SUFFIXES).
    """
    out: dict[str, object] = {}
    keys = sorted([k async for k in client.scan_iter(match=f"{prefix}:*", count=2000)])
    for key in keys:
        name = as_str(key)
        if name.endswith(VOLATILE_SUFFIXES):
            continue
        kind = as_str(await client.type(key))
        value: object
        if kind == "string" and ":bm:" in name:
            # Members, not bytes: roaring's encoding of one set depends on the edit history.
            value = list(BitMap.deserialize(as_bytes(await client.get(key))))
        elif kind == "string":
            value = await client.get(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "hash":
            value = await client.hgetall(key)
        else:
            continue
        out[name[len(prefix) :]] = value
    return out


def summarize_difference(a: Mapping[str, object], b: Mapping[str, object]) -> str:
    only_a = sorted(set(a) - set(b))[:5]
    only_b = sorted(set(b) - set(a))[:5]
    differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:5]
    summary = f"only in first: {only_a}; only in second: {only_b}; differing: {differ}"
    if differ:  # the first difference in full (cut short): diagnosable from a CI log alone
        key = differ[0]
        summary += f"; {key}: {str(a[key])[:400]} != {str(b[key])[:400]}"
    return summary


def count_kinds(snapshot: Mapping[str, object]) -> dict[str, int]:
    kinds = {"bitmap chunks": ":bm:", "cookie states": ":c:", "offsets": ":offset"}
    return {name: sum(1 for k in snapshot if marker in k) for name, marker in kinds.items()}


def kill_signal_name(sig: int) -> str:
    return signal.Signals(sig).name


async def started(proc: Process, timeout: float = 60) -> None:
    """Until the process owns partitions (before that a SIGTERM finds no handler yet)."""
    deadline = time.monotonic() + timeout
    while "assigned" not in proc.output():
        assert proc.alive, proc.output()[-3000:]
        assert time.monotonic() < deadline, proc.output()[-3000:]
        await asyncio.sleep(0.05)


async def ingest_until(
    settings: Settings, client: aioredis.Redis, log: Path, total: int, timeout: float = 300
) -> None:
    """Run `dmp ingest` until `total` events are applied, then stop it with SIGTERM."""
    proc = Process("ingest", service_env(settings), log)
    try:
        await started(proc)
        await wait_applied(client, settings, total, timeout=timeout)
        proc.signal(signal.SIGTERM)
        assert await proc.wait(30) == 0, proc.output()[-3000:]
    finally:
        if proc.alive:
            await proc.kill()
