"""Lookups through the sharded bidder client: ``ShardedDmpClient`` against two shard replicas
versus ``DmpClient`` against one unsharded replica, same data, same run.

    python -m loadtests.scaleout --mode shards [--shard-cookies 200000] [--runs 3]

1. Writes (or reuses) a ``--shard-cookies`` store (loadtests/datagen.py) and starts three
   real ``dmp lookup`` processes on it, pinned to core 0: the full replica and shards 0/2 and
   1/2. ``write_store`` puts cookie ``n`` in partition ``n % partitions``, which is where
   Kafka's murmur2 partitioner (and so the client's routing) puts it for about a quarter of
   the cookies: the lookups draw only those (Zipf over the cookies, exponent 1, the rest
   dropped), so every answer is checkable. Before measuring, a sample of lookups and of
   bid requests with ids in both shards is answered by both clients and compared.
2. This process is the load generator and the client under test, pinned to core 1.
   Interleaved ``--runs`` times, each client in turn:
   - closed loop: ``--concurrency`` tasks calling ``segments(uid)`` back to back: lookups/s
     and p50/p99/p99.9 of each call;
   - open loop: ``segments(uid)`` started at a fixed rate, ``--rate-fraction`` of the
     single client's closed-loop rate in that run, latency from the intended start (queueing
     shows in full); the generator's own lateness is reported;
   - closed loop ``enrich`` of bid requests whose ``user.id`` and eid live in different
     shards (the sharded client asks each id of its shard, bidder_adapter/sharded_enrich.py):
     two of our cookies, both in segments (two rounds, four calls), and an id we never saw
     (an exchange's) with our cookie in the eid (one round, two calls).
   The two shards share core 0, as the one full replica has it alone: the ratio is the cost
   of the client's routing and fan-out, not the capacity a second machine would add. The
   client's CPU per call (this process's CPU time over the calls) is reported too: the
   closed loop is bound by it.

Writes results/scaleout_shards.json and scaleout_shards.png, prints the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # hdrhistogram has no types
from prometheus_client import CollectorRegistry

from bidder_adapter.client import ClientConfig, ClientMetrics, DmpClient
from bidder_adapter.profiles import hash_api_key
from bidder_adapter.sharded_client import ShardedClientConfig, ShardedDmpClient
from dmp.gc_tuning import tune_for_service
from dmp.shards import partition_of, shard_of
from loadtests.common import (
    CLIENT_CORE,
    SERVER_CORE,
    CpuWatch,
    dmp_argv,
    env_with,
    median,
    on_core,
    pinned,
    pyplot,
    running,
    table,
    wait_http,
    write_result,
)
from loadtests.datagen import StoreSpec, World, cookie_id, rule_set, write_store, zipf_ranks
from loadtests.lookup import free_port
from loadtests.openloop import HIGHEST_US, LOWEST_US, SPIN_BELOW

API_KEY = "loadtest-shards-key-0001"
EID_SOURCE = "loadtest.example"
PERCENTILES = (50.0, 99.0, 99.9)
TMAX_MS = 1000.0  # far above any latency here: a call is never cut short by its deadline
CLIENTS = ("single", "sharded")
KINDS = ("closed", "open", "enrich_known", "enrich_new")
LABELS = {
    "closed": "lookups, closed loop",
    "open": "lookups, open loop",
    "enrich_known": "enrich, 2 ids in segments",
    "enrich_new": "enrich, new id + our eid",
}
FAILURES = ("error", "timeout", "circuit_open", "no_time", "misdirected")


@dataclass(frozen=True)
class Options:
    cookies: int
    segments: int
    partitions: int
    runs: int
    duration: float
    concurrency: int
    rate_fraction: float
    check: int
    prefix: str
    topic: str
    seed: int
    taxonomy: Path
    results: Path
    ready_timeout: float


def partner_file(path: Path, segment_ids: Sequence[str]) -> Path:
    """One partner that sees every segment and reads our cookie in user.id and in eids."""
    path.write_text(
        f"""partners:
  - partner_id: loadtest-shards
    kind: dsp
    api_key_sha256: {hash_api_key(API_KEY)}
    granted_segments: [{", ".join(segment_ids)}]
    output_format: ids
    segtax: 600
    data_provider_id: loadtest.example
    data_provider_name: Load test
    max_segments: 100
    user_id_sources: [cookie, eids]
    eids_sources: [{EID_SOURCE}]
"""
    )
    return path


def routable_uids(cookies: int, partitions: int, draws: int, seed: int) -> list[str]:
    """Zipf-drawn cookies that sit in the partition murmur2 routes them to."""
    ranks = zipf_ranks(np.random.default_rng(seed), cookies, draws)
    fits = {
        r for r in set(ranks.tolist()) if partition_of(cookie_id(r), partitions) == r % partitions
    }
    return [cookie_id(r) for r in ranks.tolist() if r in fits]


def _bid(n: int, user_id: str, eid: str) -> dict[str, Any]:
    eids = [{"source": EID_SOURCE, "uids": [{"id": eid}]}]
    return {"id": f"r{n}", "tmax": TMAX_MS, "user": {"id": user_id, "eids": eids}}


def known_pairs(uids: Sequence[str], partitions: int, count: int) -> list[dict[str, Any]]:
    """Bid requests whose user.id and eid are two of our cookies in different shards: both
    are in segments, so the sharded client needs its second round (the server orders)."""
    by_shard: list[list[str]] = [[], []]
    for uid in dict.fromkeys(uids):
        by_shard[shard_of(uid, partitions, 2)].append(uid)
    pairs = list(zip(by_shard[0], by_shard[1], strict=False))[:count]
    return [_bid(n, *((a, b) if n % 2 == 0 else (b, a))) for n, (a, b) in enumerate(pairs)]


def new_and_ours(uids: Sequence[str], partitions: int, count: int) -> list[dict[str, Any]]:
    """Bid requests with an id we never saw in user.id (an exchange's) and our cookie in an
    eid, in the other shard: one round of two calls."""
    out = []
    for n, uid in enumerate(list(dict.fromkeys(uids))[:count]):
        ours = shard_of(uid, partitions, 2)
        names = (f"exch-{n}-{k}" for k in range(1000))
        out.append(_bid(n, next(x for x in names if shard_of(x, partitions, 2) != ours), uid))
    return out


class Recorder:
    def __init__(self) -> None:
        self.latency = HdrHistogram(LOWEST_US, HIGHEST_US, 3)
        self.lag = HdrHistogram(LOWEST_US, HIGHEST_US, 3)
        self.calls = 0
        self.cpu = -time.process_time()  # this process: the client under test and the loop

    def record(self, seconds: float) -> None:
        self.latency.record_value(max(LOWEST_US, int(seconds * 1e6)))
        self.calls += 1

    def summary(self, seconds: float) -> dict[str, float]:
        out = {f"p{p:g}_ms": self.latency.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
        out["max_ms"] = self.latency.get_max_value() / 1000
        out["per_s"] = self.calls / seconds
        out["client_cpu_us_per_call"] = self.cpu / self.calls * 1e6 if self.calls else 0.0
        if self.lag.get_total_count():
            out["generator_lag_p99_ms"] = self.lag.get_value_at_percentile(99.0) / 1000
        return out


Call = Callable[[int], Awaitable[object]]


async def closed_loop(call: Call, concurrency: int, duration: float) -> Recorder:
    """``concurrency`` tasks calling back to back for ``duration`` seconds."""
    recorder = Recorder()
    stop_at = time.perf_counter() + duration

    async def worker(first: int) -> None:
        i = first
        while (started := time.perf_counter()) < stop_at:
            await call(i)
            recorder.record(time.perf_counter() - started)
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    recorder.cpu += time.process_time()
    return recorder


async def open_loop(call: Call, rate: float, duration: float) -> Recorder:
    """Call ``i`` starts at ``start + i / rate`` whatever is in flight; its latency counts
    from that intended time, so a slow answer shows its queueing too."""
    recorder = Recorder()
    start = time.perf_counter() + 0.05
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, intended: float) -> None:
        await call(i)
        recorder.record(time.perf_counter() - intended)

    for i in range(int(rate * duration)):
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > SPIN_BELOW:
            await asyncio.sleep(delay - SPIN_BELOW / 2)
        while time.perf_counter() < intended:  # noqa: ASYNC110  # epoll's ms timeouts start late
            await asyncio.sleep(0)
        recorder.lag.record_value(max(LOWEST_US, int((time.perf_counter() - intended) * 1e6)))
        task = asyncio.create_task(one(i, intended))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    await asyncio.gather(*in_flight)
    recorder.cpu = float("nan")  # the generator spins before each start: not the client's
    return recorder


@dataclass
class Clients:
    single: DmpClient
    sharded: ShardedDmpClient
    registry: CollectorRegistry  # both clients' call counters

    def lookup(self, name: str, uids: Sequence[str]) -> Call:
        client = self.single if name == "single" else self.sharded
        return lambda i: client.segments(uids[i % len(uids)], tmax_ms=TMAX_MS)

    def enrich(self, name: str, requests: Sequence[dict[str, Any]]) -> Call:
        client = self.single if name == "single" else self.sharded
        return lambda i: client.enrich(requests[i % len(requests)])

    def calls(self, outcome: str) -> float:
        return self.registry.get_sample_value("dmp_client_calls_total", {"outcome": outcome}) or 0.0


@contextlib.asynccontextmanager
async def clients(full: str, shards: tuple[str, ...], partitions: int) -> Any:
    registry = CollectorRegistry()
    metrics = ClientMetrics.create(registry)
    config = ClientConfig("", API_KEY, default_tmax_ms=TMAX_MS, failure_threshold=1_000_000)
    sharded_config = ShardedClientConfig(shards, partitions, API_KEY, config)
    async with (
        DmpClient(ClientConfig(full, API_KEY, default_tmax_ms=TMAX_MS), metrics) as single,
        ShardedDmpClient(sharded_config, metrics) as sharded,
    ):
        yield Clients(single, sharded, registry)


async def check(
    both: Clients, uids: Sequence[str], requests: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Both clients give the same answers; most lookups find segments."""
    sample = list(dict.fromkeys(uids))
    found = same = 0
    for uid in sample:
        want = await both.single.segments(uid, tmax_ms=TMAX_MS)
        same += await both.sharded.segments(uid, tmax_ms=TMAX_MS) == want
        found += bool(want)
    enriched = same_enrich = 0
    for request in requests:
        want_doc = await both.single.enrich(request)
        same_enrich += await both.sharded.enrich(request) == want_doc
        enriched += bool(want_doc)
    return {
        "lookups": len(sample),
        "lookups_equal": same,
        "lookups_with_segments": found,
        "enrich_requests": len(requests),
        "enrich_equal": same_enrich,
        "enrich_with_data": enriched,
    }


async def measure(opts: Options, urls: dict[str, str], pids: list[int]) -> dict[str, Any]:
    uids = routable_uids(opts.cookies, opts.partitions, 200_000, opts.seed)
    bids = {
        "enrich_known": known_pairs(uids, opts.partitions, 2000),
        "enrich_new": new_and_ours(uids, opts.partitions, 2000),
    }
    runs: list[dict[str, Any]] = []
    async with clients(urls["full"], (urls["shard0"], urls["shard1"]), opts.partitions) as both:
        few = max(1, opts.check // 20)
        sample = bids["enrich_known"][:few] + bids["enrich_new"][:few]
        checked = await check(both, uids[: opts.check], sample)
        print(f"checked: {checked}", flush=True)
        # The generator collects garbage as the services do (dmp/gc_tuning.py), for both
        # clients alike: default thresholds put full collections among the latencies.
        tune_for_service()
        for name in CLIENTS:  # warm-up: connections, caches, allocator
            await closed_loop(both.lookup(name, uids), opts.concurrency, min(1.0, opts.duration))
        for run in range(opts.runs):
            order = CLIENTS if run % 2 == 0 else CLIENTS[::-1]
            row: dict[str, Any] = {"run": run}
            for kind in KINDS:
                for name in order:
                    if kind == "closed":
                        call, rate = both.lookup(name, uids), 0.0
                    elif kind == "open":
                        call = both.lookup(name, uids)
                        rate = opts.rate_fraction * row["closed"]["single"]["per_s"]
                    else:
                        call, rate = both.enrich(name, bids[kind]), 0.0
                    with CpuWatch(pids) as watch:
                        if rate:
                            rec = await open_loop(call, rate, opts.duration)
                        else:
                            rec = await closed_loop(call, opts.concurrency, opts.duration)
                    summary = rec.summary(opts.duration)
                    summary["other_cores"] = watch.other_cores
                    row.setdefault(kind, {})[name] = summary
                print(_run_line(run, kind, row[kind]), flush=True)
            runs.append(row)
        failures = {o: both.calls(o) for o in FAILURES}
    return {"checks": checked, "runs": runs, "failed_calls": failures}


def _run_line(run: int, kind: str, pair: dict[str, dict[str, float]]) -> str:
    one, two = pair["single"], pair["sharded"]
    lag = max(one.get("generator_lag_p99_ms", 0.0), two.get("generator_lag_p99_ms", 0.0))
    return (
        f"run {run + 1} {kind:>6}: single {one['per_s']:,.0f}/s p99 {one['p99_ms']:.3f} ms, "
        f"sharded {two['per_s']:,.0f}/s p99 {two['p99_ms']:.3f} ms "
        f"(others busy {max(one['other_cores'], two['other_cores']):.2f} cores"
        + (f", generator lag p99 {lag:.3f} ms)" if lag else ")")
    )


@dataclass
class Replicas:
    urls: dict[str, str]  # full, shard0, shard1
    pids: list[int]


@contextlib.contextmanager
def replicas(
    opts: Options, redis_url: str, work: Path, partners: Path, rules: Path
) -> Iterator[Replicas]:
    """The full replica and shards 0/2, 1/2 on core 0, ready."""
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        procs = []
        for name, shard in (("full", ""), ("shard0", "0/2"), ("shard1", "1/2")):
            port = free_port()
            env = env_with(
                DMP_REDIS_URL=redis_url,
                DMP_REDIS_CLUSTER="0",
                DMP_REDIS_KEY_PREFIX=opts.prefix,
                DMP_KAFKA_TOPIC=opts.topic,
                DMP_KAFKA_PARTITIONS=str(opts.partitions),
                DMP_RULES_PATH=str(rules),
                DMP_PARTNERS_PATH=str(partners),
                DMP_LOOKUP_HOST="127.0.0.1",
                DMP_LOOKUP_PORT=str(port),
                DMP_LOOKUP_SHARD=shard,
                DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS="0",
                DMP_LOG_LEVEL="WARNING",
            )
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            argv = pinned(SERVER_CORE, dmp_argv("lookup"))
            procs.append((name, stack.enter_context(running(f"lookup-{name}", argv, env, work))))
            urls[name] = f"http://127.0.0.1:{port}"
        for name, proc in procs:
            ready = wait_http(f"{urls[name]}/readyz", proc, opts.ready_timeout)
            print(f"{name} ready in {ready:.1f}s", flush=True)
        yield Replicas(urls, [proc.popen.pid for _, proc in procs])


def run(opts: Options, redis_url: str) -> dict[str, Any]:
    world = World(seed=opts.seed, taxonomy=opts.taxonomy)
    rules = rule_set(world, opts.segments)
    spec = StoreSpec(
        opts.prefix, opts.topic, opts.partitions, opts.cookies, opts.segments, opts.seed
    )
    client = redis.Redis.from_url(redis_url)
    try:
        store = write_store(client, spec, rules)
    finally:
        client.close()
    print(f"store: {spec.fingerprint}, {'reused' if store.reused else 'written'}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lt-shards-"))
    rules_path = work / "rules.yaml"
    rules_path.write_text(rules.text)
    partners = partner_file(work / "partners.yaml", list(rules.segment_ids))
    started = time.time()
    with replicas(opts, redis_url, work, partners, rules_path) as up, on_core(CLIENT_CORE):
        # This process is the generator: its own CPU is not "other people's work".
        measured = asyncio.run(measure(opts, up.urls, [os.getpid(), *up.pids]))
    doc = summarise(opts, measured, store.memberships)
    doc["started_at"] = started
    write_result("scaleout_shards", doc, lambda p: chart(doc, p), opts.results)
    print_table(doc)
    return doc


def summarise(opts: Options, measured: dict[str, Any], memberships: int) -> dict[str, Any]:
    runs = measured["runs"]
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for kind in KINDS:
        medians[kind] = {}
        for name in CLIENTS:
            keys = runs[0][kind][name].keys()
            medians[kind][name] = {k: median([r[kind][name][k] for r in runs]) for k in keys}
    ratios = {
        kind: {
            k: medians[kind]["sharded"][k] / medians[kind]["single"][k]
            for k in ("per_s", "p50_ms", "p99_ms", "p99.9_ms", "client_cpu_us_per_call")
            if medians[kind]["single"][k] > 0
        }
        for kind in medians
    }
    checks = measured["checks"]
    return {
        "test": "scaleout_shards",
        "params": {
            "cookies": opts.cookies,
            "segments": opts.segments,
            "partitions": opts.partitions,
            "memberships": memberships,
            "runs": opts.runs,
            "duration_s": opts.duration,
            "concurrency": opts.concurrency,
            "open_loop_rate_fraction": opts.rate_fraction,
        },
        "checks": checks,
        "failed_calls": measured["failed_calls"],
        "medians": medians,
        "ratios_sharded_over_single": ratios,
        "runs": runs,
        "budgets": {
            "sharded_lookups_equal_single": checks["lookups_equal"] == checks["lookups"] > 0,
            "sharded_enrich_equal_single": checks["enrich_equal"] == checks["enrich_requests"] > 0,
            "no_failed_calls": not any(measured["failed_calls"].values()),
        },
    }


def print_table(doc: dict[str, Any]) -> None:
    rows = []
    for kind, label in LABELS.items():
        for name in CLIENTS:
            m = doc["medians"][kind][name]
            cpu = m["client_cpu_us_per_call"]
            rows.append([label, name, m["per_s"], m["p50_ms"], m["p99_ms"], m["p99.9_ms"], cpu])
        r = doc["ratios_sharded_over_single"][kind]
        keys = ("per_s", "p50_ms", "p99_ms", "p99.9_ms", "client_cpu_us_per_call")
        ratio = [r.get(k, float("nan")) for k in keys]
        rows.append([label, "sharded/single", *ratio])
    print()
    headers = ["what", "client", "calls/s", "p50 ms", "p99 ms", "p99.9 ms", "client CPU us/call"]
    print(table(headers, rows))
    for name, met in doc["budgets"].items():
        print(f"{name}: {'met' if met else 'NOT met'}")
    print(f"failed calls: {doc['failed_calls']}")


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(LABELS), figsize=(16, 3.8))
    for ax, (kind, title) in zip(axes, LABELS.items(), strict=True):
        m = doc["medians"][kind]
        x = np.arange(len(PERCENTILES))
        for offset, name, color in ((-0.2, "single", "#999"), (0.2, "sharded", "#37c")):
            values = [m[name][f"p{p:g}_ms"] for p in PERCENTILES]
            ax.bar(x + offset, values, 0.4, color=color, label=f"{name} {m[name]['per_s']:,.0f}/s")
        ax.set_xticks(x, [f"p{p:g}" for p in PERCENTILES])
        ax.set_ylabel("ms")
        ratio = doc["ratios_sharded_over_single"][kind].get("per_s", float("nan"))
        ax.set_title(f"{title}: calls/s x{ratio:.2f}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
