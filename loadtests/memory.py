"""Memory and start-up: bytes per membership in Redis and in a lookup replica; time to ready.

    python -m loadtests.memory [--cookies 10000000] [--populations 1000 10000 100000 1000000 5000000]

1. Redis: for each population, one segment of that many members among ``--cookies`` cookies is
   written in the store's layout (per partition, per 2^16 chunk of positions: loadtests/
   datagen.py) under a fresh prefix; bytes per membership = the sum of ``MEMORY USAGE`` of its
   keys, and the ``INFO memory`` ``used_memory`` delta, divided by the members.
2. Replica: the real ``dmp lookup`` is started on a store of ``--cookies`` cookies and no
   segment (the id index alone), then on the same cookies plus one segment of each
   population; the replica's cost per membership is the RSS difference (``VmRSS`` of the
   process once ``/readyz`` answers 200) divided by the members. The id index is reported per
   cookie.
3. The whole lookup dataset (``--segments`` segments, populations 1K to 5M): RSS per membership
   and start-up time to ``/readyz``, first from the segment bitmaps (no snapshot), then from
   the snapshots a replica writes (``DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS``); each
   ``--runs`` times, medians.

Writes results/memory.json and memory.png, prints the tables. Budgets (ARCHITECTURE.md): at
most 3 bytes per membership for segments of 1M members and more; ready in under 30 s with
1,000 segments and 10M cookies.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from dmp.keys import PartitionKeys
from loadtests.common import (
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
from loadtests.datagen import (
    RuleSet,
    StoreSpec,
    World,
    delete_prefix,
    rule_set,
    write_store,
)
from loadtests.lookup import free_port

BYTES_BUDGET = 3.0
READY_BUDGET_S = 30.0


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def key_bytes(client: redis.Redis, prefix: str, pattern: str) -> tuple[int, int]:
    """(sum of MEMORY USAGE, number of keys) over keys matching ``prefix:pattern``."""
    total = keys = 0
    for key in client.scan_iter(match=f"{prefix}:{pattern}", count=5000):
        total += int(client.memory_usage(key, samples=0) or 0)
        keys += 1
    return total, keys


def one_segment_rules(world: World) -> RuleSet:
    """A rule file of one base segment (``lt_probe``), to be given members directly."""
    return rule_set(world, 1)


def redis_cost(
    client: redis.Redis, world: World, cookies: int, population: int, seed: int
) -> dict[str, float]:
    prefix = f"lt-mem-{uuid.uuid4().hex[:8]}"
    spec = StoreSpec(prefix, "lt.mem", 4, cookies, 1, seed)
    rules = one_segment_rules(world)
    try:
        before = used_memory(client)
        report = write_store(client, spec, rules, force=True, sizes={rules.base_ids[0]: population})
        after = used_memory(client)
        bitmap, keys = key_bytes(client, prefix, "*:bm:*")
        ids, _ = key_bytes(client, prefix, "*:ids")
        members = report.memberships
        return {
            "population": members,
            "bitmap_keys": keys,
            "memory_usage_bytes_per_member": bitmap / members,
            "serialized_bytes_per_member": report.bitmap_bytes / members,
            "used_memory_delta_bytes_per_member": (after - before - ids) / members,
            "ids_bytes_per_cookie": ids / cookies,
        }
    finally:
        delete_prefix(client, prefix)


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def replica_load(
    redis_url: str,
    prefix: str,
    topic: str,
    rules_text: str,
    work: Path,
    snapshots: bool = False,
    partitions: int = 4,
) -> dict[str, float]:
    """Start ``dmp lookup`` on a store; seconds to ready and RSS once ready."""
    port = free_port()
    rules_path = work / f"rules-{prefix}.yaml"
    rules_path.write_text(rules_text)
    env = env_with(
        DMP_REDIS_URL=redis_url,
        DMP_REDIS_KEY_PREFIX=prefix,
        DMP_KAFKA_TOPIC=topic,
        DMP_RULES_PATH=str(rules_path),
        DMP_LOOKUP_HOST="127.0.0.1",
        DMP_LOOKUP_PORT=str(port),
        DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS="1" if snapshots else "0",
        DMP_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running(f"replica-{prefix}", dmp_argv("lookup"), env, work) as proc:
        ready = wait_http(f"http://127.0.0.1:{port}/readyz", proc, 900)
        time.sleep(1.0)  # let the allocator settle after the load
        rss = vm_rss(proc.popen.pid)
        gauges = replica_gauges(f"http://127.0.0.1:{port}/metrics")
        if snapshots:
            client = redis.Redis.from_url(redis_url)
            parts = [PartitionKeys(prefix, topic, p) for p in range(partitions)]
            try:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    written = all(client.exists(k.snapshot) for k in parts)
                    if written and not any(client.exists(k.snapshot_lock) for k in parts):
                        break
                    time.sleep(0.5)
            finally:
                client.close()
    return {"ready_s": ready, "rss_bytes": rss, **gauges}


def replica_gauges(url: str) -> dict[str, float]:
    """The replica's own account: roaring container bytes of its index, and memberships."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    out = {"index_bytes": float("nan"), "memberships": float("nan")}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "dmp_replica_bitmap_bytes":
            out["index_bytes"] = float(value)
        elif name == "dmp_replica_memberships":
            out["memberships"] = float(value)
    return out


def drop_snapshots(client: redis.Redis, prefix: str, topic: str) -> None:
    for p in range(256):
        client.delete(PartitionKeys(prefix, topic, p).snapshot)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument(
        "--populations", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000, 5_000_000]
    )
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prefix", default="lt", help="the lookup test's store (reused)")
    parser.add_argument("--topic", default="lt.events")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    redis_url, _ = stack_urls()
    client = redis.Redis.from_url(redis_url)
    world = World(seed=args.seed, taxonomy=args.taxonomy)
    work = Path(tempfile.mkdtemp(prefix="lt-memory-"))
    started = time.time()

    redis_rows = []
    for population in args.populations:
        row = redis_cost(client, world, args.cookies, population, args.seed)
        redis_rows.append(row)
        print(
            f"redis, {population:,} members: {row['memory_usage_bytes_per_member']:.2f} B/member",
            flush=True,
        )

    # Replica: the id index alone, then one segment of each population on the same cookies.
    replica_rows = []
    base_prefix = f"lt-memr-{uuid.uuid4().hex[:6]}"
    rules = one_segment_rules(world)
    try:
        write_store(
            client,
            StoreSpec(base_prefix, "lt.mem", 4, args.cookies, 0, args.seed),
            rules,
            force=True,
            sizes={},
        )
        ids_only = replica_load(redis_url, base_prefix, "lt.mem", rules.text, work)
        for population in args.populations:
            prefix = f"{base_prefix}-{population}"
            report = write_store(
                client,
                StoreSpec(prefix, "lt.mem", 4, args.cookies, 1, args.seed),
                rules,
                force=True,
                sizes={rules.base_ids[0]: population},
            )
            loaded = replica_load(redis_url, prefix, "lt.mem", rules.text, work)
            delete_prefix(client, prefix)
            members = report.memberships
            replica_rows.append(
                {
                    "population": members,
                    "index_bytes_per_member": loaded["index_bytes"] / members,
                    "rss_delta_bytes_per_member": (loaded["rss_bytes"] - ids_only["rss_bytes"])
                    / members,
                    "ready_s": loaded["ready_s"],
                }
            )
            print(
                f"replica, {members:,} members: "
                f"{replica_rows[-1]['index_bytes_per_member']:.2f} B/member (index), "
                f"{replica_rows[-1]['rss_delta_bytes_per_member']:.2f} (RSS delta)",
                flush=True,
            )
    finally:
        delete_prefix(client, base_prefix)

    # The whole lookup dataset: start-up from bitmaps, then from snapshots.
    full_rules = rule_set(world, args.segments)
    spec = StoreSpec(args.prefix, args.topic, 4, args.cookies, args.segments, args.seed)
    store = write_store(client, spec, full_rules)
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    for run in range(args.runs):
        drop_snapshots(client, args.prefix, args.topic)
        cold.append(replica_load(redis_url, args.prefix, args.topic, full_rules.text, work))
        print(f"run {run + 1}: ready from bitmaps in {cold[-1]['ready_s']:.1f}s", flush=True)
    # One replica writes snapshots, then later replicas start from them.
    replica_load(redis_url, args.prefix, args.topic, full_rules.text, work, snapshots=True)
    for run in range(args.runs):
        warm.append(replica_load(redis_url, args.prefix, args.topic, full_rules.text, work))
        print(f"run {run + 1}: ready from snapshots in {warm[-1]['ready_s']:.1f}s", flush=True)
    drop_snapshots(client, args.prefix, args.topic)
    client.close()

    members = store.memberships
    full = {
        "cookies": args.cookies,
        "segments": args.segments,
        "memberships": members,
        "ready_from_bitmaps_s": median([c["ready_s"] for c in cold]),
        "ready_from_snapshots_s": median([w["ready_s"] for w in warm]),
        "rss_bytes": median([c["rss_bytes"] for c in cold]),
        "index_bytes_per_membership": median([c["index_bytes"] for c in cold]) / members,
        "rss_bytes_per_membership": (median([c["rss_bytes"] for c in cold]) - ids_only["rss_bytes"])
        / members,
        "ids_only_rss_bytes": ids_only["rss_bytes"],
        "ids_only_rss_bytes_per_cookie": ids_only["rss_bytes"] / args.cookies,
        "runs": {"bitmaps": cold, "snapshots": warm},
    }
    big = [r for r in redis_rows if r["population"] >= 1_000_000]
    doc = {
        "test": "memory",
        "params": {"cookies": args.cookies, "populations": args.populations, "runs": args.runs},
        "started_at": started,
        "redis": redis_rows,
        "replica": replica_rows,
        "full_dataset": full,
        "budgets": {
            "redis_at_most_3_bytes_per_membership_from_1M": all(
                r["memory_usage_bytes_per_member"] <= BYTES_BUDGET for r in big
            ),
            "replica_ready_under_30s": min(
                full["ready_from_bitmaps_s"], full["ready_from_snapshots_s"]
            )
            < READY_BUDGET_S,
            "replica_ready_under_30s_without_snapshot": full["ready_from_bitmaps_s"]
            < READY_BUDGET_S,
        },
    }
    write_result("memory", doc, lambda p: chart(doc, p), args.results)
    print_tables(doc)
    return doc


def print_tables(doc: dict[str, Any]) -> None:
    rows = []
    replica = {r["population"]: r for r in doc["replica"]}
    for r in doc["redis"]:
        rep = replica.get(r["population"], {})
        rows.append(
            [
                r["population"],
                r["bitmap_keys"],
                r["memory_usage_bytes_per_member"],
                r["serialized_bytes_per_member"],
                r["used_memory_delta_bytes_per_member"],
                rep.get("index_bytes_per_member", float("nan")),
                rep.get("rss_delta_bytes_per_member", float("nan")),
            ]
        )
    print()
    print(
        table(
            [
                "members",
                "keys",
                "Redis B/m",
                "serialized B/m",
                "used_memory B/m",
                "replica index B/m",
                "replica RSS B/m",
            ],
            rows,
        )
    )
    f = doc["full_dataset"]
    print()
    print(
        table(
            [
                "dataset",
                "memberships",
                "RSS MB",
                "RSS B/m",
                "index B/m",
                "ready (bitmaps) s",
                "ready (snapshots) s",
            ],
            [
                [
                    f"{f['cookies']:,} cookies x {f['segments']} segments",
                    f["memberships"],
                    f["rss_bytes"] / 1e6,
                    f["rss_bytes_per_membership"],
                    f["index_bytes_per_membership"],
                    f["ready_from_bitmaps_s"],
                    f["ready_from_snapshots_s"],
                ]
            ],
        )
    )
    print(f"id index alone: {f['ids_only_rss_bytes_per_cookie']:.1f} B of RSS per cookie")
    for name, ok in doc["budgets"].items():
        print(f"budget {name}: {'met' if ok else 'NOT met'}")


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    pops = [r["population"] for r in doc["redis"]]
    ax.plot(pops, [r["memory_usage_bytes_per_member"] for r in doc["redis"]], "o-", label="Redis")
    if doc["replica"]:
        ax.plot(
            [r["population"] for r in doc["replica"]],
            [r["index_bytes_per_member"] for r in doc["replica"]],
            "s-",
            label="replica index (one segment)",
        )
    ax.axhline(BYTES_BUDGET, color="r", ls=":", lw=0.8, label="budget (>= 1M members)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("segment members")
    ax.set_ylabel("bytes per membership")
    ax.legend(fontsize=8)
    ax.set_title("memory per membership")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
