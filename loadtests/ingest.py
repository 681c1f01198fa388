"""Ingest load test: events/s from Kafka to committed Redis state, and freshness.

    python -m loadtests.ingest [--events 300000] [--segments 10 100 1000] [--runs 3]

1. Throughput. The same ``--events`` generated events (loadtests/datagen.py: Zipf cookies
   over ``--cookies``, sessions, taxonomy categories, geo) are produced once to a fresh topic.
   Then, ``--runs`` times, interleaved: the baseline (loadtests/ingest_baseline.py: aiokafka
   consuming + orjson decoding, nothing else) and the real ``dmp ingest`` with a rule file of
   each size, each alone in its own process pinned to core 0 and reading the topic from the
   start. Ingest's rate is read from Redis: the partitions' committed offsets (written in the
   same transaction as the state), polled every 50 ms, from the first commit to the last.
2. Freshness. ``dmp ingest`` and ``dmp lookup`` follow a fresh topic while this process
   produces events at 80 % of the measured maximum rate (``--freshness-segments`` rules),
   plus every 50 ms a probe event for a never-seen cookie; each probe's latency is from its
   produce time to the lookup's HTTP answer naming the ``lt_probe`` segment (polled every
   10 ms).

Writes results/ingest.json and ingest.png, prints the tables. Budgets (ARCHITECTURE.md):
>= 50,000 events/s with 100 segments; >= 0.5 x decode-only with 1,000; freshness p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import uuid
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from dmp.config import KafkaSettings
from dmp.keys import PartitionKeys
from dmp.topics import create_topics
from loadtests.common import (
    CLIENT_CORE,
    REPO,
    RESULTS,
    SERVER_CORE,
    TAXONOMY,
    dmp_argv,
    env_with,
    exit_on_sigterm,
    median,
    on_core,
    pinned,
    pyplot,
    python_argv,
    running,
    stack_urls,
    table,
    wait_http,
    write_result,
)
from loadtests.datagen import PROBE_SEGMENT, World, delete_prefix, events, probe_event, rule_set
from loadtests.lookup import free_port

EVENTS_BUDGET = 50_000
RATIO_BUDGET = 0.5
FRESHNESS_BUDGET_S = 1.0
PROBE_INTERVAL = 0.05
POLL_INTERVAL = 0.01
Message = tuple[int, bytes, bytes]  # partition, key, value


def encode_events(
    world: World, count: int, cookies: int, seed: int, partitions: int
) -> list[Message]:
    """Events as Kafka messages keyed by uid, partitioned as aiokafka's producer would."""
    partitioner = DefaultPartitioner()
    parts = list(range(partitions))
    out = []
    for event in events(world, count, cookies=cookies, seed=seed, now=time.time()):
        key = event["uid"].encode()
        out.append((partitioner(key, parts, parts), key, orjson.dumps(event)))
    return out


async def produce_all(bootstrap: str, topic: str, messages: list[Message]) -> None:
    """Send everything fast: one record batch per partition at a time."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        pending: dict[int, Any] = {}
        futures = []
        for partition, key, value in messages:
            batch = pending.get(partition)
            if batch is None:
                batch = pending[partition] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = pending[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in pending.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def new_topic(bootstrap: str, partitions: int) -> KafkaSettings:
    name = f"lt-ingest-{uuid.uuid4().hex[:8]}"
    kafka = replace(
        KafkaSettings(),
        bootstrap=bootstrap,
        topic=name,
        dead_letter_topic=f"{name}.dlq",
        partitions=partitions,
    )
    await create_topics(kafka)
    return kafka


async def delete_topics(kafka: KafkaSettings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([kafka.topic, kafka.dead_letter_topic])
    finally:
        await admin.close()


def committed(client: redis.Redis, prefix: str, topic: str, partitions: int) -> int:
    keys = [PartitionKeys(prefix, topic, p).offset for p in range(partitions)]
    return sum(int(v) for v in client.mget(keys) if v is not None)


def run_ingest(
    kafka: KafkaSettings,
    redis_url: str,
    rules_path: Path,
    total: int,
    work: Path,
    timeout: float,
) -> dict[str, float]:
    """One ``dmp ingest`` process from the topic's start until every event is committed."""
    prefix = f"lt-ing-{uuid.uuid4().hex[:8]}"
    env = env_with(
        DMP_KAFKA_BOOTSTRAP=kafka.bootstrap,
        DMP_KAFKA_TOPIC=kafka.topic,
        DMP_KAFKA_DEAD_LETTER_TOPIC=kafka.dead_letter_topic,
        DMP_KAFKA_GROUP_ID=f"g-{prefix}",
        DMP_REDIS_URL=redis_url,
        DMP_REDIS_KEY_PREFIX=prefix,
        DMP_RULES_PATH=str(rules_path),
        DMP_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    client = redis.Redis.from_url(redis_url)
    try:
        with running("ingest", pinned(SERVER_CORE, dmp_argv("ingest")), env, work) as proc:
            opened = time.perf_counter()
            first_t, first_n = 0.0, 0
            deadline = time.monotonic() + timeout
            while True:
                done = committed(client, prefix, kafka.topic, kafka.partitions)
                now = time.perf_counter()
                if done and not first_t:
                    first_t, first_n = now, done
                if done >= total:
                    break
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"dmp ingest exited:\n{proc.tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ingest committed {done}/{total} in {timeout}s")
                time.sleep(0.05)
        timed, seconds = total - first_n, now - first_t
        if not timed:  # all in the first commit (tiny runs): time from the process start
            timed, seconds = total, now - opened
        rate = timed / seconds if seconds > 0 else float("nan")
        return {"events_per_s": rate, "seconds": seconds, "timed_events": timed}
    finally:
        delete_prefix(client, prefix)
        client.close()


def run_baseline(kafka: KafkaSettings, total: int, timeout: float) -> dict[str, float]:
    argv = python_argv(
        "loadtests.ingest_baseline",
        "--bootstrap",
        kafka.bootstrap,
        "--topic",
        kafka.topic,
        "--events",
        str(total),
        "--timeout",
        str(timeout),
    )
    out = subprocess.run(
        pinned(SERVER_CORE, argv), check=True, capture_output=True, timeout=timeout + 60, cwd=REPO
    ).stdout
    doc: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return doc


# -- freshness ------------------------------------------------------------------------
async def freshness(
    kafka: KafkaSettings,
    lookup_url: str,
    background: list[Message],
    rate: float,
    duration: float,
) -> dict[str, Any]:
    """Produce ``background`` at ``rate``/s with probes; seconds from produce to visible."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=1)
    partitioner = DefaultPartitioner()
    parts = list(range(kafka.partitions))
    await producer.start()
    outstanding: deque[tuple[str, float]] = deque()
    latencies: list[float] = []
    stop = asyncio.Event()
    run_id = uuid.uuid4().hex[:6]

    async def poll(session: aiohttp.ClientSession) -> None:
        while not (stop.is_set() and not outstanding):
            for uid, sent_at in list(outstanding):
                async with session.get(f"{lookup_url}/v1/users/{uid}/segments") as resp:
                    doc = await resp.json()
                if PROBE_SEGMENT in doc.get("segments", []):
                    latencies.append(time.time() - sent_at)
                    outstanding.remove((uid, sent_at))
                elif time.time() - sent_at > 30:
                    outstanding.remove((uid, sent_at))
                    latencies.append(float("inf"))
            await asyncio.sleep(POLL_INTERVAL)

    sent = 0
    try:
        async with aiohttp.ClientSession() as session:
            poller = asyncio.create_task(poll(session))
            start = time.perf_counter()
            next_probe = start
            probes = 0
            tick = 0.01
            while (elapsed := time.perf_counter() - start) < duration:
                due = min(len(background), int(elapsed * rate))
                batches: dict[int, Any] = {}
                for partition, key, value in background[sent:due]:
                    batch = batches.get(partition)
                    if batch is None:
                        batch = batches[partition] = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        await producer.send_batch(batch, kafka.topic, partition=partition)
                        batch = batches[partition] = producer.create_batch()
                        batch.append(key=key, value=value, timestamp=None)
                sent = due
                if time.perf_counter() >= next_probe:
                    uid = f"probe-{run_id}-{probes}"
                    key = uid.encode()
                    partition = partitioner(key, parts, parts)
                    batch = batches.get(partition)
                    if batch is None:
                        batch = batches[partition] = producer.create_batch()
                    value = orjson.dumps(probe_event(uid, time.time()))
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        await producer.send_batch(batch, kafka.topic, partition=partition)
                        batch = batches[partition] = producer.create_batch()
                        batch.append(key=key, value=value, timestamp=None)
                    outstanding.append((uid, time.time()))
                    probes += 1
                    next_probe += PROBE_INTERVAL
                for partition, batch in batches.items():
                    await producer.send_batch(batch, kafka.topic, partition=partition)
                await asyncio.sleep(max(0.0, tick - (time.perf_counter() - start - elapsed)))
            achieved = sent / (time.perf_counter() - start)
            stop.set()
            await asyncio.wait_for(poller, timeout=60)
    finally:
        await producer.stop()
    arr = np.array(latencies, dtype=float)
    finite = arr[np.isfinite(arr)]
    pct = {
        f"p{p:g}_s": float(np.percentile(finite, p)) if len(finite) else float("nan")
        for p in (50, 90, 99)
    }
    return {
        "offered_rate": rate,
        "achieved_rate": achieved,
        "probes": len(latencies),
        "lost_probes": int((~np.isfinite(arr)).sum()),
        **pct,
        "max_s": float(finite.max()) if len(finite) else float("nan"),
    }


def run_freshness(
    kafka_bootstrap: str,
    redis_url: str,
    rules_path: Path,
    background: list[Message],
    rate: float,
    duration: float,
    work: Path,
) -> dict[str, Any]:
    kafka = asyncio.run(new_topic(kafka_bootstrap, 4))
    prefix = f"lt-fresh-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = env_with(
        DMP_KAFKA_BOOTSTRAP=kafka.bootstrap,
        DMP_KAFKA_TOPIC=kafka.topic,
        DMP_KAFKA_DEAD_LETTER_TOPIC=kafka.dead_letter_topic,
        DMP_KAFKA_GROUP_ID=f"g-{prefix}",
        DMP_REDIS_URL=redis_url,
        DMP_REDIS_KEY_PREFIX=prefix,
        DMP_RULES_PATH=str(rules_path),
        DMP_LOOKUP_HOST="127.0.0.1",
        DMP_LOOKUP_PORT=str(port),
        DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS="0",
        DMP_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    client = redis.Redis.from_url(redis_url)
    try:
        with (
            running("fresh-ingest", pinned(SERVER_CORE, dmp_argv("ingest")), env, work),
            running("fresh-lookup", pinned(CLIENT_CORE, dmp_argv("lookup")), env, work) as lookup,
            on_core(CLIENT_CORE),
        ):
            wait_http(f"http://127.0.0.1:{port}/readyz", lookup, 120)
            time.sleep(min(3.0, duration))  # the consumer group settles (join + assignment)
            return asyncio.run(
                freshness(kafka, f"http://127.0.0.1:{port}", background, rate, duration)
            )
    finally:
        delete_prefix(client, prefix)
        client.close()
        asyncio.run(delete_topics(kafka))


# -- the test -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument("--segments", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--freshness-segments", type=int, default=100)
    parser.add_argument("--freshness-seconds", type=float, default=20.0)
    parser.add_argument("--freshness-fraction", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    redis_url, bootstrap = stack_urls()
    world = World(seed=args.seed, taxonomy=args.taxonomy)
    work = Path(tempfile.mkdtemp(prefix="lt-ingest-"))
    rule_paths = {}
    for count in sorted({*args.segments, args.freshness_segments}):
        path = work / f"rules-{count}.yaml"
        path.write_text(rule_set(world, count).text)
        rule_paths[count] = path
    messages = encode_events(world, args.events, args.cookies, args.seed, args.partitions)
    size = sum(len(v) for _, _, v in messages) / len(messages)
    distinct = len({k for _, k, _ in messages})
    print(f"{len(messages):,} events ({size:.0f} bytes, {distinct:,} cookies)", flush=True)
    kafka = asyncio.run(new_topic(bootstrap, args.partitions))
    started = time.time()
    baseline: list[float] = []
    ours: dict[int, list[float]] = {n: [] for n in args.segments}
    try:
        asyncio.run(produce_all(bootstrap, kafka.topic, messages))
        for run in range(args.runs):
            res = run_baseline(kafka, len(messages), args.timeout)
            baseline.append(res["events_per_s"])
            print(f"run {run + 1}: decode-only {res['events_per_s']:,.0f}/s", flush=True)
            for count in args.segments:
                r = run_ingest(
                    kafka, redis_url, rule_paths[count], len(messages), work, args.timeout
                )
                ours[count].append(r["events_per_s"])
                print(
                    f"run {run + 1}: dmp ingest, {count} segments: {r['events_per_s']:,.0f}/s",
                    flush=True,
                )
    finally:
        asyncio.run(delete_topics(kafka))

    # 80 % of the rate measured with the freshness rule set (or the nearest size measured).
    reference = median(ours[min(ours, key=lambda n: abs(n - args.freshness_segments))])
    rate = args.freshness_fraction * reference
    background = encode_events(
        world, int(rate * args.freshness_seconds) + 1, args.cookies, args.seed + 1, 4
    )
    print(f"freshness at {rate:,.0f} events/s for {args.freshness_seconds:.0f}s ...", flush=True)
    fresh = run_freshness(
        bootstrap,
        redis_url,
        rule_paths[args.freshness_segments],
        background,
        rate,
        args.freshness_seconds,
        work,
    )
    doc = summarise(args, size, distinct, baseline, ours, fresh)
    doc["started_at"] = started
    write_result("ingest", doc, lambda p: chart(doc, p), args.results)
    print_tables(doc)
    return doc


def summarise(
    args: argparse.Namespace,
    size: float,
    distinct: int,
    baseline: list[float],
    ours: dict[int, list[float]],
    fresh: dict[str, Any],
) -> dict[str, Any]:
    base = median(baseline)
    rows: list[dict[str, Any]] = [
        {
            "segments": n,
            "runs_events_per_s": runs,
            "events_per_s": median(runs),
            "ratio_to_decode_only": median(runs) / base if base else float("nan"),
        }
        for n, runs in ours.items()
    ]
    by_n = {r["segments"]: r for r in rows}
    budgets: dict[str, bool] = {}
    if 100 in by_n:
        budgets["at_least_50000_events_per_s_with_100"] = by_n[100]["events_per_s"] >= EVENTS_BUDGET
    if 1000 in by_n:
        budgets["at_least_half_decode_only_with_1000"] = (
            by_n[1000]["ratio_to_decode_only"] >= RATIO_BUDGET
        )
    budgets["freshness_p99_at_most_1s"] = fresh["p99_s"] <= FRESHNESS_BUDGET_S
    return {
        "test": "ingest",
        "params": {
            "events": args.events,
            "event_bytes": size,
            "distinct_cookies": distinct,
            "cookie_universe": args.cookies,
            "partitions": args.partitions,
            "runs": args.runs,
            "freshness_segments": args.freshness_segments,
            "freshness_seconds": args.freshness_seconds,
            "ingest_core": SERVER_CORE,
            "producer_core": CLIENT_CORE,
        },
        "decode_only": {"runs_events_per_s": baseline, "events_per_s": base},
        "ingest": rows,
        "freshness": fresh,
        "budgets": budgets,
    }


def print_tables(doc: dict[str, Any]) -> None:
    base = doc["decode_only"]["events_per_s"]
    rows: list[list[object]] = [["decode only", base, 1.0]]
    rows += [
        [f"{r['segments']} segments", r["events_per_s"], r["ratio_to_decode_only"]]
        for r in doc["ingest"]
    ]
    print()
    print(table(["consumer", "events/s", "x decode-only"], rows))
    f = doc["freshness"]
    print()
    print(
        table(
            ["offered/s", "achieved/s", "probes", "lost", "p50 s", "p90 s", "p99 s", "max s"],
            [
                [
                    f["offered_rate"],
                    f["achieved_rate"],
                    f["probes"],
                    f["lost_probes"],
                    f["p50_s"],
                    f["p90_s"],
                    f["p99_s"],
                    f["max_s"],
                ]
            ],
        )
    )
    for name, ok in doc["budgets"].items():
        print(f"budget {name}: {'met' if ok else 'NOT met'}")


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    counts = [r["segments"] for r in doc["ingest"]]
    ax.plot(counts, [r["events_per_s"] for r in doc["ingest"]], "o-", label="dmp ingest")
    ax.axhline(doc["decode_only"]["events_per_s"], color="#999", ls="--", label="decode only")
    ax.axhline(EVENTS_BUDGET, color="r", ls=":", lw=0.8, label="budget (100 segments)")
    ax.set_xscale("log")
    ax.set_xlabel("segments in the rule file")
    ax.set_ylabel("events/s, Kafka to committed Redis (one process)")
    f = doc["freshness"]
    ax.set_title(
        f"ingest throughput; freshness p99 {f['p99_s']:.2f}s at {f['offered_rate']:,.0f}/s"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
