"""Ingest load test: events/s from Kafka to committed Redis state, and freshness.

    python -m loadtests.ingest [--events 300000] [--segments 10 100 1000] [--runs 3]

1. Throughput. The same ``--events`` generated events (loadtests/datagen.py: Zipf cookies
   over ``--cookies``, sessions, taxonomy categories, geo) are produced once to a fresh topic.
   Then, ``--runs`` times, interleaved: the baseline (loadtests/ingest_baseline.py: aiokafka
   consuming + orjson decoding, nothing else) and the real ``dmp ingest`` with a rule file of
   each size, each alone in its own process pinned to core 0 and reading the topic from the
   start. Ingest's rate is read from Redis: the partitions' committed offsets (written in the
   same transaction as the state), polled every 50 ms, from the first commit to the last.
2. Live maximum. ``dmp ingest`` and ``dmp lookup`` follow a fresh topic while this process
   produces at the pre-produced maximum of step 1 (``--freshness-segments`` rules), exactly
   as in step 3. When a backlog is left at the end, ingest fell behind, and the rate it
   committed at (past the first quarter) is its maximum while the broker takes writes and
   the producer runs on the same machine: the live maximum (docs/decisions/0010). When it
   fell well behind (under 0.9 x offered), once more at 1.1 x that rate, since producing
   far above capacity costs more than the freshness phase does; the higher reading counts.
3. Freshness. The same, ``--freshness-runs`` times (3), each on another fresh topic, at 80 %
   of the live maximum (of the pre-produced one when the live run left no backlog, or with
   ``--freshness-basis pre-produced``, the basis before 0010; both rates are printed), plus
   every 50 ms a probe event for a never-seen cookie; each probe's latency is from its
   produce time to the lookup's HTTP answer naming the ``lt_probe`` segment (polled every
   10 ms), split at the moment Redis holds its offset (sampled every 10 ms): produce ->
   committed by ingest -> visible in the lookup. The run with the median p99 is the result.

Writes results/ingest.json and ingest.png, prints the tables. Budgets (ARCHITECTURE.md):
>= 50,000 events/s with 100 segments; >= 0.5 x decode-only with 1,000; freshness p99 <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    CpuWatch,
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
# "others busy" above this during a live or freshness run: other people's work shared the
# cores (the live maximum read low, the freshness rate with it); say so.
OTHERS_SUSPECT_CORES = 0.5
LIVE_ATTEMPTS = 2
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


def run_baseline(
    kafka: KafkaSettings, total: int, timeout: float, write_floor: str | None = None
) -> dict[str, float]:
    """Decode-only; with ``write_floor`` (a Redis URL), plus the writes every batch makes."""
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
        *(["--write-floor", write_floor] if write_floor else []),
    )
    out = subprocess.run(
        pinned(SERVER_CORE, argv), check=True, capture_output=True, timeout=timeout + 60, cwd=REPO
    ).stdout
    doc: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return doc


# -- freshness ------------------------------------------------------------------------
@dataclass
class Probe:
    uid: str
    partition: int
    sent_at: float
    offset: int | None = None  # known once the broker acknowledged its batch
    committed_at: float | None = None  # first offset sample in Redis past it
    visible_at: float | None = None


async def freshness(
    kafka: KafkaSettings,
    lookup_url: str,
    background: list[Message],
    rate: float,
    duration: float,
    offsets: Callable[[], list[int]],
) -> dict[str, Any]:
    """Produce ``background`` at ``rate``/s with probes; seconds from produce to visible.

    ``offsets`` reads the partitions' committed offsets from Redis (every 10 ms), which
    splits each probe's time into produce -> committed by ingest -> visible in the lookup,
    and gives the rate ingest committed at while this process produced (``committed_rate``).
    """
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=1)
    partitioner = DefaultPartitioner()
    parts = list(range(kafka.partitions))
    await producer.start()
    outstanding: deque[Probe] = deque()
    probes: list[Probe] = []
    uncommitted: list[Probe] = []
    samples: list[tuple[float, int]] = []  # (time, events committed)
    stop = asyncio.Event()
    run_id = uuid.uuid4().hex[:6]

    async def poll(session: aiohttp.ClientSession) -> None:
        while not (stop.is_set() and not outstanding):
            for probe in list(outstanding):
                async with session.get(f"{lookup_url}/v1/users/{probe.uid}/segments") as resp:
                    doc = await resp.json()
                if PROBE_SEGMENT in doc.get("segments", []):
                    probe.visible_at = time.time()
                    outstanding.remove(probe)
                elif time.time() - probe.sent_at > 30:
                    outstanding.remove(probe)  # lost: visible_at stays None
            await asyncio.sleep(POLL_INTERVAL)

    async def sample_offsets() -> None:
        while not (stop.is_set() and not outstanding):
            now, done = time.time(), offsets()
            samples.append((now, sum(done)))
            for probe in uncommitted[:]:
                if probe.offset is not None and done[probe.partition] > probe.offset:
                    probe.committed_at = now
                    uncommitted.remove(probe)
            await asyncio.sleep(POLL_INTERVAL)

    def acked(probe: Probe, relative: int) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                probe.offset = fut.result().offset + relative

        return done

    sent = 0
    try:
        async with aiohttp.ClientSession() as session:
            poller = asyncio.create_task(poll(session))
            sampler = asyncio.create_task(sample_offsets())
            start = time.perf_counter()
            started_at = time.time()
            next_probe = start
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
                probe = None
                if time.perf_counter() >= next_probe:
                    uid = f"probe-{run_id}-{len(probes)}"
                    key = uid.encode()
                    partition = partitioner(key, parts, parts)
                    batch = batches.get(partition)
                    if batch is None:
                        batch = batches[partition] = producer.create_batch()
                    value = orjson.dumps(probe_event(uid, time.time()))
                    meta = batch.append(key=key, value=value, timestamp=None)
                    if meta is None:
                        await producer.send_batch(batch, kafka.topic, partition=partition)
                        batch = batches[partition] = producer.create_batch()
                        meta = batch.append(key=key, value=value, timestamp=None)
                    probe = Probe(uid, partition, time.time())
                    probes.append(probe)
                    outstanding.append(probe)
                    uncommitted.append(probe)
                    next_probe += PROBE_INTERVAL
                for partition, batch in batches.items():
                    fut = await producer.send_batch(batch, kafka.topic, partition=partition)
                    if probe is not None and partition == probe.partition:
                        fut.add_done_callback(acked(probe, meta.offset))
                await asyncio.sleep(max(0.0, tick - (time.perf_counter() - start - elapsed)))
            achieved = sent / (time.perf_counter() - start)
            produced_until = time.time()
            stop.set()
            await asyncio.wait_for(poller, timeout=60)
            await asyncio.wait_for(sampler, timeout=60)
    finally:
        await producer.stop()
    # Probes are events too: the committed offsets count them.
    total = sent + len(probes)
    return summarise_probes(probes, samples, rate, achieved, total, started_at, produced_until)


def summarise_probes(
    probes: list[Probe],
    samples: list[tuple[float, int]],
    rate: float,
    achieved: float,
    sent: int,
    started_at: float,
    produced_until: float,
) -> dict[str, Any]:
    def pct(values: list[float], prefix: str) -> dict[str, float]:
        arr = np.array(values, dtype=float)
        out = {
            f"{prefix}p{p:g}_s": float(np.percentile(arr, p)) if len(arr) else float("nan")
            for p in (50, 90, 99)
        }
        out[f"{prefix}max_s"] = float(arr.max()) if len(arr) else float("nan")
        return out

    seen = [p for p in probes if p.visible_at is not None]
    split = [p for p in seen if p.committed_at is not None]
    # The rate ingest committed at while we produced, past the first quarter (group join,
    # warm-up); with a backlog throughout, that is its maximum under live production.
    window = [(t, n) for t, n in samples if started_at + 0.25 * (produced_until - started_at) <= t]
    window = [(t, n) for t, n in window if t <= produced_until]
    committed_rate = float("nan")
    if len(window) >= 2 and window[-1][0] > window[0][0]:
        committed_rate = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0])
    lag_at_end = sent - window[-1][1] if window else None
    return {
        "offered_rate": rate,
        "achieved_rate": achieved,
        "probes": len(probes),
        "lost_probes": len(probes) - len(seen),
        **pct([p.visible_at - p.sent_at for p in seen if p.visible_at is not None], ""),
        **pct([p.committed_at - p.sent_at for p in split if p.committed_at is not None], "commit_"),
        **pct(
            [
                p.visible_at - p.committed_at
                for p in split
                if p.visible_at is not None and p.committed_at is not None
            ],
            "visible_after_commit_",
        ),
        "committed_rate": committed_rate,
        "events_sent": sent,
        "lag_at_end": lag_at_end,
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
    """``dmp ingest`` and ``dmp lookup`` on a fresh topic while we produce at ``rate``."""
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
            running("fresh-ingest", pinned(SERVER_CORE, dmp_argv("ingest")), env, work) as ingest,
            running("fresh-lookup", pinned(CLIENT_CORE, dmp_argv("lookup")), env, work) as lookup,
            on_core(CLIENT_CORE),
        ):
            wait_http(f"http://127.0.0.1:{port}/readyz", lookup, 120)
            time.sleep(min(3.0, duration))  # the consumer group settles (join + assignment)
            keys = [PartitionKeys(prefix, kafka.topic, p).offset for p in range(kafka.partitions)]

            def offsets() -> list[int]:
                return [int(v) if v is not None else 0 for v in client.mget(keys)]

            with CpuWatch([ingest.popen.pid, lookup.popen.pid, os.getpid()]) as watch:
                result = asyncio.run(
                    freshness(
                        kafka, f"http://127.0.0.1:{port}", background, rate, duration, offsets
                    )
                )
            # Ingest, lookup and this process excluded; Kafka and Redis are not (they may be
            # remote): "others busy" includes their work for us, about 0.2 cores here.
            return {**result, "others_busy_cores": watch.other_cores}
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
    parser.add_argument(
        "--freshness-runs",
        type=int,
        default=3,
        help="freshness runs at the same rate, each on a fresh topic; the run with the median"
        " p99 is reported (the lower middle one for an even count)",
    )
    parser.add_argument(
        "--freshness-basis",
        choices=["live", "pre-produced"],
        default="live",
        help="the maximum the freshness rate is a fraction of: measured while this process"
        " produces, as during the freshness phase (live, the default since"
        " docs/decisions/0010), or only the throughput runs' pre-produced one (the old basis)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.freshness_runs < 1:
        parser.error("--freshness-runs must be at least 1")

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
    floor: list[float] = []  # decode + the Redis writes of every batch, no rules (0018)
    floor_redis_cpu: list[float] = []  # the Redis server's CPU us an event in those runs
    ours: dict[int, list[float]] = {n: [] for n in args.segments}
    try:
        asyncio.run(produce_all(bootstrap, kafka.topic, messages))
        for run in range(args.runs):
            res = run_baseline(kafka, len(messages), args.timeout)
            baseline.append(res["events_per_s"])
            print(f"run {run + 1}: decode-only {res['events_per_s']:,.0f}/s", flush=True)
            res = run_baseline(kafka, len(messages), args.timeout, write_floor=redis_url)
            floor.append(res["events_per_s"])
            floor_redis_cpu.append(res["redis_cpu_us_per_event"])
            print(
                f"run {run + 1}: write floor {res['events_per_s']:,.0f}/s"
                f" (Redis CPU {res['redis_cpu_us_per_event']:.2f} us an event)",
                flush=True,
            )
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

    # The maximum with the freshness rule set (or the nearest size measured), read from a
    # pre-produced topic as above.
    pre_produced = median(ours[min(ours, key=lambda n: abs(n - args.freshness_segments))])
    rules_path = rule_paths[args.freshness_segments]
    live_runs: list[dict[str, Any]] = []
    if args.freshness_basis == "live":
        # The maximum in the freshness phase's own conditions (docs/decisions/0010): ingest
        # and lookup as below while this process produces, first at the pre-produced
        # maximum. Producing far above ingest's capacity costs this process and the broker
        # more than the freshness phase will, which reads low; so when ingest fell well
        # behind, once more at 1.1 x what it committed (just above its capacity).
        offered = pre_produced
        for attempt in range(LIVE_ATTEMPTS):
            background = encode_events(
                world,
                int(offered * args.freshness_seconds) + 1,
                args.cookies,
                args.seed + 2 + attempt,
                4,
            )
            print(f"live maximum: producing at {offered:,.0f} events/s ...", flush=True)
            trial = run_freshness(
                bootstrap, redis_url, rules_path, background, offered, args.freshness_seconds, work
            )
            trial["saturated"] = saturated(trial)
            live_runs.append(trial)
            grew = "grew" if trial["saturated"] else "did not grow"
            print(
                f"live maximum: ingest committed {trial['committed_rate']:,.0f}/s while we"
                f" produced {trial['achieved_rate']:,.0f}/s (backlog {grew})",
                flush=True,
            )
            if not trial["saturated"] or trial["committed_rate"] >= 0.9 * offered:
                break
            offered = 1.1 * trial["committed_rate"]
    live = max(live_runs, key=lambda r: r["committed_rate"]) if live_runs else None
    reference, basis = max_basis(pre_produced, live_runs)
    rate = args.freshness_fraction * reference
    background = encode_events(
        world, int(rate * args.freshness_seconds) + 1, args.cookies, args.seed + 1, 4
    )
    print(
        f"freshness at {rate:,.0f} events/s = {args.freshness_fraction:g} x {basis}"
        f" {reference:,.0f}/s (the old basis, {args.freshness_fraction:g} x the pre-produced"
        f" maximum, would be {args.freshness_fraction * pre_produced:,.0f}/s)"
        f" for {args.freshness_seconds:.0f}s ...",
        flush=True,
    )
    fresh_runs = []
    for run in range(args.freshness_runs):
        if run:  # other cookies and times each run, at the same rate
            background = encode_events(
                world,
                int(rate * args.freshness_seconds) + 1,
                args.cookies,
                args.seed + 100 + run,
                4,
            )
        fresh_runs.append(
            run_freshness(
                bootstrap, redis_url, rules_path, background, rate, args.freshness_seconds, work
            )
        )
        print(f"freshness run {run + 1}: p99 {fresh_runs[-1]['p99_s']:.3f} s", flush=True)
    fresh = median_run(fresh_runs)
    fresh["runs"] = fresh_runs
    fresh["basis"] = basis
    fresh["basis_rate"] = reference
    fresh["fraction"] = args.freshness_fraction
    fresh["pre_produced_max"] = pre_produced
    fresh["rate_on_old_basis"] = args.freshness_fraction * pre_produced
    fresh["live_max"] = live
    fresh["live_runs"] = live_runs
    doc = summarise(args, size, distinct, baseline, ours, fresh, floor, floor_redis_cpu)
    doc["started_at"] = started
    write_result("ingest", doc, lambda p: chart(doc, p), args.results)
    print_tables(doc)
    return doc


def verdict_suspect(fresh: dict[str, Any]) -> bool:
    """Whether the freshness verdict rests on a run others' work disturbed: a live maximum
    run (it sets the rate) or the median run. Another freshness run is flagged in the table
    but decides nothing."""
    decisive = [*fresh["live_runs"], fresh["runs"][fresh["median_run"]]]
    return any(r["others_busy_cores"] > OTHERS_SUSPECT_CORES for r in decisive)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of the run with the median p99 (the lower middle one for an even count), and
    its position in ``runs`` as ``median_run``. A run whose probes never became visible
    (p99 NaN) counts as the slowest."""

    def p99(n: int) -> float:
        value = float(runs[n]["p99_s"])
        return math.inf if math.isnan(value) else value

    middle = sorted(range(len(runs)), key=p99)[(len(runs) - 1) // 2]
    return {**runs[middle], "median_run": middle}


def saturated(live: dict[str, Any]) -> bool:
    """A backlog at the end of the live run: ingest's committed rate is then its maximum.

    At least a second of events still uncommitted when we stopped producing: ingest fell
    behind the offered rate, so it committed as fast as it could.
    """
    lag = live.get("lag_at_end")
    return (
        lag is not None and math.isfinite(live["committed_rate"]) and lag >= live["achieved_rate"]
    )


def max_basis(pre_produced: float, live_runs: list[dict[str, Any]]) -> tuple[float, str]:
    """(rate, name) the freshness rate is a fraction of.

    Once a live run fell behind, ingest's capacity under production is below the
    pre-produced maximum; every live run's committed rate is a lower bound of it (a run that
    kept up committed what it was offered), and the highest is the least pessimistic.
    """
    if any(r["saturated"] for r in live_runs):
        best = max(r["committed_rate"] for r in live_runs)
        return min(pre_produced, best), "the live maximum"
    # No live run fell behind: ingest kept up with the pre-produced maximum even while we
    # produced, so that rate is no overstatement; or --freshness-basis pre-produced.
    return pre_produced, "the pre-produced maximum"


def summarise(
    args: argparse.Namespace,
    size: float,
    distinct: int,
    baseline: list[float],
    ours: dict[int, list[float]],
    fresh: dict[str, Any],
    floor: list[float] | None = None,
    floor_redis_cpu: list[float] | None = None,
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
    fresh["suspect"] = verdict_suspect(fresh)
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
            "freshness_fraction": args.freshness_fraction,
            "freshness_runs": args.freshness_runs,
            "freshness_basis": args.freshness_basis,
            "ingest_core": SERVER_CORE,
            "producer_core": CLIENT_CORE,
        },
        "decode_only": {"runs_events_per_s": baseline, "events_per_s": base},
        "write_floor": {
            "runs_events_per_s": floor or [],
            "events_per_s": median(floor) if floor else None,
            "ratio_to_decode_only": median(floor) / base if floor and base else None,
            "runs_redis_cpu_us_per_event": floor_redis_cpu or [],
            "redis_cpu_us_per_event": median(floor_redis_cpu) if floor_redis_cpu else None,
        },
        "ingest": rows,
        "freshness": fresh,
        "budgets": budgets,
    }


def print_tables(doc: dict[str, Any]) -> None:
    base = doc["decode_only"]["events_per_s"]
    rows: list[list[object]] = [["decode only", base, 1.0]]
    floor = doc["write_floor"]
    if floor["events_per_s"] is not None:
        rows.append(
            ["write floor (no rules)", floor["events_per_s"], floor["ratio_to_decode_only"]]
        )
    rows += [
        [f"{r['segments']} segments", r["events_per_s"], r["ratio_to_decode_only"]]
        for r in doc["ingest"]
    ]
    print()
    print(table(["consumer", "events/s", "x decode-only"], rows))
    if floor["events_per_s"] is not None:
        print(
            "(write floor: decode-only plus each batch's state, due time and offset writes in"
            " PartitionStore's transaction shape, no rules: a ceiling, docs/decisions/0018;"
            f" Redis's own CPU {floor['redis_cpu_us_per_event']:.2f} us an event, median)"
        )
    f = doc["freshness"]
    print()
    print(
        f"freshness rate = {f['fraction']:g} x {f['basis']} ({f['basis_rate']:,.0f}/s)."
        f" The pre-produced maximum (throughput runs above) is {f['pre_produced_max']:,.0f}/s;"
        f" {f['fraction']:g} x that, the basis before docs/decisions/0010, would be"
        f" {f['rate_on_old_basis']:,.0f}/s."
    )
    runs = [(f"live max {n + 1}", r) for n, r in enumerate(f["live_runs"])]
    runs += [
        (f"freshness {n + 1}" + (" (median)" if n == f["median_run"] else ""), r)
        for n, r in enumerate(f["runs"])
    ]
    print(
        table(
            [
                "run",
                "offered/s",
                "achieved/s",
                "committed/s",
                "lag at end",
                "probes",
                "lost",
                "p50 s",
                "p90 s",
                "p99 s",
                "max s",
                "p99 to commit",
                "p99 commit to visible",
                "others busy",
            ],
            [
                [
                    name,
                    r["offered_rate"],
                    r["achieved_rate"],
                    r["committed_rate"],
                    r["lag_at_end"],
                    r["probes"],
                    r["lost_probes"],
                    r["p50_s"],
                    r["p90_s"],
                    r["p99_s"],
                    r["max_s"],
                    r["commit_p99_s"],
                    r["visible_after_commit_p99_s"],
                    r["others_busy_cores"],
                ]
                for name, r in runs
            ],
        )
    )
    print(
        "(committed/s: ingest's rate while we produced, past the first quarter; others busy:"
        " cores used by anything but ingest, lookup and this process, Kafka and Redis included)"
    )
    for name, r in runs:
        if r["others_busy_cores"] > OTHERS_SUSPECT_CORES:
            print(
                f"SUSPECT {name}: other work used {r['others_busy_cores']:.2f} cores"
                f" (Kafka and Redis alone take about 0.2-0.3 here): re-run before trusting it"
            )
    for name, ok in doc["budgets"].items():
        note = " (SUSPECT run, see above)" if name.startswith("freshness") and f["suspect"] else ""
        print(f"budget {name}: {'met' if ok else 'NOT met'}{note}")


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    counts = [r["segments"] for r in doc["ingest"]]
    ax.plot(counts, [r["events_per_s"] for r in doc["ingest"]], "o-", label="dmp ingest")
    ax.axhline(doc["decode_only"]["events_per_s"], color="#999", ls="--", label="decode only")
    if doc["write_floor"]["events_per_s"] is not None:
        ax.axhline(
            doc["write_floor"]["events_per_s"],
            color="#c80",
            ls="-.",
            label="write floor (no rules)",
        )
    ax.axhline(EVENTS_BUDGET, color="r", ls=":", lw=0.8, label="budget (100 segments)")
    ax.set_xscale("log")
    ax.set_xlabel("segments in the rule file")
    ax.set_ylabel("events/s, Kafka to committed Redis (one process)")
    f = doc["freshness"]
    ax.set_title(
        f"ingest throughput; freshness p99 {f['p99_s']:.2f}s (median of {len(f['runs'])})"
        f" at {f['offered_rate']:,.0f}/s"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
