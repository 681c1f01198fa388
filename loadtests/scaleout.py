"""Scale-out on one machine: two ingest processes in one consumer group, lookup workers.

    python -m loadtests.scaleout [--events 300000] [--runs 3]

1. Ingest: the same events (loadtests/datagen.py) consumed by one ``dmp ingest`` and by two in
   one consumer group, each into its own Redis prefix, interleaved ``--runs`` times;
   throughput from the first commit to the last (offsets in Redis). Correctness: after each
   two-process run, every partition's offset, ``ids`` array and every segment bitmap equals
   the single process's.
2. Lookup: ``dmp lookup`` with one worker and with ``--workers 2`` (SO_REUSEPORT) on a
   ``--lookup-cookies`` store, closed loop with wrk, interleaved ``--runs`` times. On this
   2-core machine the workers, wrk, Redis and Kafka share both cores (nothing is pinned
   here), so the ratio shows what a second core buys, not linear scaling.

Writes results/scaleout.json and scaleout.png, prints the tables.

    python -m loadtests.scaleout --mode shards [--shard-cookies 200000] [--runs 3]

3. Shards (only this, with ``--mode shards``; loadtests/shard_latency.py): lookups/s and
   p50/p99/p99.9 through ``ShardedDmpClient`` against two shard replicas versus a
   ``DmpClient`` against one unsharded replica, same store, interleaved ``--runs`` times.
   Writes results/scaleout_shards.json and scaleout_shards.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from dmp.keys import PartitionKeys
from loadtests import shard_latency
from loadtests.common import (
    REPO,
    RESULTS,
    TAXONOMY,
    dmp_argv,
    env_with,
    exit_on_sigterm,
    median,
    pyplot,
    running,
    stack_urls,
    table,
    wait_http,
    write_result,
)
from loadtests.datagen import StoreSpec, World, delete_prefix, rule_set, write_store
from loadtests.ingest import committed, delete_topics, encode_events, new_topic, produce_all
from loadtests.lookup import free_port, wrk


def ingest_group(
    kafka: Any,
    redis_url: str,
    rules_path: Path,
    total: int,
    processes: int,
    work: Path,
    timeout: float,
) -> tuple[float, str]:
    """``processes`` ingest processes in one group; (events/s, the prefix they wrote)."""
    prefix = f"lt-so-{uuid.uuid4().hex[:8]}"
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
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(running(f"ingest-{processes}-{n}", dmp_argv("ingest"), env, work))
            for n in range(processes)
        ]
        spawned = time.perf_counter()
        first_t, first_n = 0.0, 0
        deadline = time.monotonic() + timeout
        while True:
            done = committed(client, prefix, kafka.topic, kafka.partitions)
            now = time.perf_counter()
            if done and not first_t:
                first_t, first_n = now, done
            if done >= total:
                break
            for proc in procs:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"dmp ingest exited:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"committed {done}/{total} in {timeout}s")
            time.sleep(0.05)
    client.close()
    seconds = now - first_t
    if seconds <= 0:
        # Everything landed before the first look (tiny smoke runs): time from the spawn,
        # start-up included, rather than divide by zero.
        seconds, first_n = now - spawned, 0
    return (total - first_n) / seconds, prefix


def snapshot_state(client: redis.Redis, prefix: str, topic: str, partitions: int) -> dict[str, Any]:
    """Offsets, ids arrays and every bitmap of a prefix, for comparison."""
    state: dict[str, Any] = {}
    for p in range(partitions):
        keys = PartitionKeys(prefix, topic, p)
        state[f"{p}:offset"] = client.get(keys.offset)
        state[f"{p}:next_local"] = client.get(keys.next_local)
        state[f"{p}:ids"] = client.get(keys.ids)
        for key in client.scan_iter(match=keys.bitmap_pattern, count=5000):
            segment, chunk = keys.parse_bitmap_key(key.decode())
            state[f"{p}:bm:{segment}:{chunk}"] = client.get(key)
    return state


@contextlib.contextmanager
def lookup_server(
    redis_url: str, prefix: str, topic: str, rules_path: Path, workers: int, work: Path
) -> Iterator[str]:
    port = free_port()
    env = env_with(
        DMP_REDIS_URL=redis_url,
        DMP_REDIS_KEY_PREFIX=prefix,
        DMP_KAFKA_TOPIC=topic,
        DMP_RULES_PATH=str(rules_path),
        DMP_LOOKUP_HOST="127.0.0.1",
        DMP_LOOKUP_PORT=str(port),
        DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS="0",
        DMP_LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(work / f"metrics-{workers}"),
    )
    argv = dmp_argv("lookup", "--workers", str(workers))
    with running(f"lookup-{workers}w", argv, env, work) as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, 600)
        time.sleep(2.0 if workers > 1 else 0.5)  # the other workers finish loading too
        yield url


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument("--segments", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--lookup-cookies", type=int, default=1_000_000)
    parser.add_argument("--lookup-segments", type=int, default=1000)
    parser.add_argument("--lookup-prefix", default="lt-so-lookup")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--mode",
        choices=("ingest-lookup", "shards"),
        default="ingest-lookup",
        help="shards: the sharded client against two shard replicas (loadtests/shard_latency.py)",
    )
    parser.add_argument("--shard-cookies", type=int, default=200_000)
    parser.add_argument("--shard-segments", type=int, default=100)
    parser.add_argument("--shard-prefix", default="lt-so-shards")
    parser.add_argument("--shard-duration", type=float, default=4.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop tasks")
    parser.add_argument("--rate-fraction", type=float, default=0.25, help="open loop: x single")
    parser.add_argument("--shard-check", type=int, default=2000, help="lookups compared first")
    args = parser.parse_args(argv)

    redis_url, bootstrap = stack_urls()
    if args.mode == "shards":
        return shard_latency.run(
            shard_latency.Options(
                cookies=args.shard_cookies,
                segments=args.shard_segments,
                partitions=args.partitions,
                runs=args.runs,
                duration=args.shard_duration,
                concurrency=args.concurrency,
                rate_fraction=args.rate_fraction,
                check=args.shard_check,
                prefix=args.shard_prefix,
                topic="lt.events",
                seed=args.seed,
                taxonomy=args.taxonomy,
                results=args.results,
                ready_timeout=args.timeout,
            ),
            redis_url,
        )
    client = redis.Redis.from_url(redis_url)
    world = World(seed=args.seed, taxonomy=args.taxonomy)
    work = Path(tempfile.mkdtemp(prefix="lt-scaleout-"))
    rules_path = work / "rules.yaml"
    rules_path.write_text(rule_set(world, args.segments).text)
    messages = encode_events(world, args.events, args.cookies, args.seed, args.partitions)
    kafka = asyncio.run(new_topic(bootstrap, args.partitions))
    started = time.time()
    rates: dict[int, list[float]] = {1: [], 2: []}
    equal: list[bool] = []
    try:
        asyncio.run(produce_all(bootstrap, kafka.topic, messages))
        for run in range(args.runs):
            one, one_prefix = ingest_group(
                kafka, redis_url, rules_path, len(messages), 1, work, args.timeout
            )
            two, two_prefix = ingest_group(
                kafka, redis_url, rules_path, len(messages), 2, work, args.timeout
            )
            a = snapshot_state(client, one_prefix, kafka.topic, args.partitions)
            b = snapshot_state(client, two_prefix, kafka.topic, args.partitions)
            equal.append(a == b)
            delete_prefix(client, one_prefix)
            delete_prefix(client, two_prefix)
            rates[1].append(one)
            rates[2].append(two)
            print(
                f"run {run + 1}: one process {one:,.0f}/s, two {two:,.0f}/s, "
                f"state equal: {a == b} ({len(a)} keys)",
                flush=True,
            )
    finally:
        asyncio.run(delete_topics(kafka))

    lookup_rules = rule_set(world, args.lookup_segments)
    lookup_rules_path = work / "lookup-rules.yaml"
    lookup_rules_path.write_text(lookup_rules.text)
    spec = StoreSpec(
        args.lookup_prefix, "lt.events", 4, args.lookup_cookies, args.lookup_segments, args.seed
    )
    write_store(client, spec, lookup_rules)
    lookup_rps: dict[int, list[float]] = {1: [], 2: []}
    lua = REPO / "loadtests" / "zipf.lua"
    zipf = [str(args.lookup_cookies), "1.0"]
    for run in range(args.runs):
        for workers in (1, 2) if run % 2 == 0 else (2, 1):
            with lookup_server(
                redis_url, spec.prefix, spec.topic, lookup_rules_path, workers, work
            ) as url:
                res = wrk(url, lua, args.duration, 64, [*zipf, str(run)], core=None)
            lookup_rps[workers].append(res["rps"])
            print(f"run {run + 1}: lookup, {workers} worker(s): {res['rps']:,.0f}/s", flush=True)
    client.close()

    doc: dict[str, Any] = {
        "test": "scaleout",
        "started_at": started,
        "params": {
            "events": args.events,
            "segments": args.segments,
            "partitions": args.partitions,
            "runs": args.runs,
            "lookup_cookies": args.lookup_cookies,
            "lookup_segments": args.lookup_segments,
        },
        "ingest": {
            "one_process_events_per_s": median(rates[1]),
            "two_processes_events_per_s": median(rates[2]),
            "ratio": median(rates[2]) / median(rates[1]),
            "runs": {"1": rates[1], "2": rates[2]},
            "final_state_equal": equal,
        },
        "lookup": {
            "one_worker_rps": median(lookup_rps[1]),
            "two_workers_rps": median(lookup_rps[2]),
            "ratio": median(lookup_rps[2]) / median(lookup_rps[1]),
            "runs": {"1": lookup_rps[1], "2": lookup_rps[2]},
        },
        "budgets": {"two_consumers_final_state_equals_one": all(equal)},
    }
    write_result("scaleout", doc, lambda p: chart(doc, p), args.results)
    print()
    print(
        table(
            ["what", "one", "two", "two/one", "state equal"],
            [
                [
                    "ingest processes, events/s",
                    doc["ingest"]["one_process_events_per_s"],
                    doc["ingest"]["two_processes_events_per_s"],
                    doc["ingest"]["ratio"],
                    str(all(equal)),
                ],
                [
                    "lookup workers, req/s",
                    doc["lookup"]["one_worker_rps"],
                    doc["lookup"]["two_workers_rps"],
                    doc["lookup"]["ratio"],
                    "",
                ],
            ],
        )
    )
    return doc


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    i, lk = doc["ingest"], doc["lookup"]
    left.bar(["1 process", "2 processes"], [i["one_process_events_per_s"],
             i["two_processes_events_per_s"]], color=["#999", "#37c"])  # fmt: skip
    left.set_title(f"ingest, one group: x{i['ratio']:.2f}")
    left.set_ylabel("events/s")
    right.bar(["1 worker", "2 workers"], [lk["one_worker_rps"], lk["two_workers_rps"]],
              color=["#999", "#37c"])  # fmt: skip
    right.set_title(f"lookup, SO_REUSEPORT: x{lk['ratio']:.2f}")
    right.set_ylabel("requests/s (wrk)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
