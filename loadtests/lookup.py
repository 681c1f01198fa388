"""Lookup load test: ``dmp lookup`` against a bare aiohttp handler, side by side in one run.

    python -m loadtests.lookup [--cookies 10000000] [--segments 1000] [--runs 3]

1. Writes (or reuses) the Redis state of ``--cookies`` cookies and ``--segments`` segments
   directly in the store's layout (loadtests/datagen.py), and starts the real ``dmp lookup``
   on it and ``loadtests.bare_server`` beside it, both pinned to core 0 (taskset).
2. Closed loop, with wrk pinned to core 1: maximum requests/s of each, the two interleaved
   ``--runs`` times; uids are Zipf-drawn over the cookies (loadtests/zipf.lua).
3. Open loop, with loadtests/openloop.py pinned to core 1: p50/p99/p99.9/max at fixed
   fractions of the bare handler's maximum rate, both servers, interleaved ``--runs`` times.
4. Batch: ``POST /v1/partner/segments/batch`` with ``--batch-users`` cookies per request
   (wrk, loadtests/batch.lua): user lookups/s on the one core.

Writes results/lookup.json and lookup.png; prints the tables. Budgets (ARCHITECTURE.md):
ours >= 0.8 x bare closed-loop throughput; p99 <= 2 ms at half the bare rate; batch >=
50,000 user lookups/s per core.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import redis

from bidder_adapter.profiles import hash_api_key
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
    pinned,
    pyplot,
    python_argv,
    running,
    stack_urls,
    table,
    wait_http,
    write_result,
)
from loadtests.datagen import StoreSpec, World, rule_set, write_store

API_KEY = "loadtest-partner-key-0001"
PERCENTILE_KEYS = ("p50_ms", "p99_ms", "p99.9_ms", "max_ms")
THROUGHPUT_BUDGET = 0.8
P99_BUDGET_MS = 2.0
BATCH_BUDGET = 50_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def broker_answers(bootstrap: str) -> bool:
    """Whether something accepts connections at the first Kafka bootstrap address."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def ensure_wrk() -> str:
    """wrk from Debian's package, installed when missing (the machine runs as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        subprocess.run(cmd, check=False, capture_output=True, timeout=600)
        found = shutil.which("wrk")
        if found:
            return found
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, timeout=600)
    return shutil.which("wrk") or "wrk"


def wrk(
    url: str,
    script: Path,
    duration: float,
    connections: int,
    script_args: list[str],
    core: int | None = CLIENT_CORE,
) -> dict[str, float]:
    argv = [ensure_wrk(), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    argv += ["-s", str(script), url, "--", *script_args]
    out = subprocess.run(
        pinned(core, argv), check=True, capture_output=True, text=True, timeout=600
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?(\d+).*?(\d+).*?(\d+).*?(\d+)", out)
    return {
        "rps": float(rps.group(1)),
        "non_2xx": float(bad.group(1)) if bad else 0.0,
        "socket_errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }


def open_loop(
    port: int, rate: float, duration: float, cookies: int, seed: int, connections: int
) -> dict[str, Any]:
    argv = python_argv(
        "loadtests.openloop",
        "--port",
        str(port),
        "--rate",
        f"{rate:.1f}",
        "--duration",
        str(duration),
        "--cookies",
        str(cookies),
        "--seed",
        str(seed),
        "--connections",
        str(connections),
    )
    out = subprocess.run(
        pinned(CLIENT_CORE, argv),
        check=True,
        capture_output=True,
        timeout=duration * 3 + 120,
        cwd=REPO,
    ).stdout
    doc: dict[str, Any] = orjson.loads(out.splitlines()[-1])
    return doc


def partner_file(path: Path, segment_ids: list[str]) -> Path:
    granted = ", ".join(segment_ids)
    path.write_text(
        f"""partners:
  - partner_id: loadtest-dsp
    kind: dsp
    api_key_sha256: {hash_api_key(API_KEY)}
    granted_segments: [{granted}]
    output_format: ids
    segtax: 600
    data_provider_id: loadtest.example
    data_provider_name: Load test
    max_segments: 100
    user_id_sources: [cookie]
"""
    )
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cookies", type=int, default=10_000_000)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batch-users", type=int, default=100)
    parser.add_argument("--prefix", default="lt")
    parser.add_argument("--topic", default="lt.events")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--taxonomy", type=Path, default=TAXONOMY)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)

    redis_url, bootstrap = stack_urls()
    # The lookup reads only Redis. An idle broker on this machine still compiles in bursts
    # (its JIT threads), on core 0 too: p99 1.6-70 ms with it, 0.7-2.2 ms without, for the
    # bare handler at the same rate (docs/decisions/0020).
    kafka_running = broker_answers(bootstrap)
    if kafka_running:
        print(
            f"warning: a Kafka broker answers at {bootstrap}; the lookup does not use it, and "
            "an idle broker's JIT threads stall core 0 for milliseconds. Stop it "
            "(deploy/kafka.sh stop) for tail latencies worth reading.",
            flush=True,
        )
    world = World(seed=args.seed, taxonomy=args.taxonomy)
    rules = rule_set(world, args.segments)
    spec = StoreSpec(
        args.prefix, args.topic, args.partitions, args.cookies, args.segments, args.seed
    )
    print(f"store: {spec.fingerprint} ...", flush=True)
    client = redis.Redis.from_url(redis_url)
    try:
        store = write_store(client, spec, rules)
        # Another replica (one run by hand, with snapshots on) may have left snapshots of this
        # store: the start-up time then measures a snapshot load, and says so.
        snapshots = sum(1 for _ in client.scan_iter(match=f"{args.prefix}:*:snapshot"))
    finally:
        client.close()
    ready_from = "snapshots" if snapshots else "bitmaps"
    print(
        f"store: {'reused' if store.reused else 'written'}, {store.memberships:,} memberships",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="lt-lookup-"))
    rules_path = work / "rules.yaml"
    rules_path.write_text(rules.text)
    partners = partner_file(work / "partners.yaml", list(rules.segment_ids))
    ours_port, bare_port = free_port(), free_port()
    env = env_with(
        DMP_REDIS_URL=redis_url,
        DMP_REDIS_KEY_PREFIX=args.prefix,
        DMP_KAFKA_TOPIC=args.topic,
        DMP_RULES_PATH=str(rules_path),
        DMP_PARTNERS_PATH=str(partners),
        DMP_LOOKUP_HOST="127.0.0.1",
        DMP_LOOKUP_PORT=str(ours_port),
        DMP_LOOKUP_SNAPSHOT_INTERVAL_SECONDS="0",
        DMP_LOG_LEVEL="WARNING",
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    zipf_args = [str(args.cookies), "1.0"]
    urls = {"bare": f"http://127.0.0.1:{bare_port}", "ours": f"http://127.0.0.1:{ours_port}"}
    closed: dict[str, list[float]] = {"bare": [], "ours": []}
    noise: list[float] = []  # other processes' busy cores during each measurement
    open_runs: list[dict[str, Any]] = []
    batch_runs: list[dict[str, float]] = []
    ours_cmd = pinned(SERVER_CORE, dmp_argv("lookup"))
    bare_cmd = pinned(SERVER_CORE, python_argv("loadtests.bare_server", "--port", str(bare_port)))
    started = time.time()
    with (
        running("lookup-ours", ours_cmd, env, work) as ours,
        running("lookup-bare", bare_cmd, env, work) as bare,
    ):
        ready_s = wait_http(f"{urls['ours']}/readyz", ours, args.ready_timeout)
        wait_http(f"{urls['bare']}/readyz", bare, 30)
        print(f"ours ready in {ready_s:.1f}s (loaded from {ready_from})", flush=True)
        pids = [ours.popen.pid, bare.popen.pid]
        lua = REPO / "loadtests" / "zipf.lua"
        for name in ("bare", "ours"):  # warm-up: caches, allocator, branch predictors
            wrk(urls[name], lua, min(3.0, args.duration), args.connections, [*zipf_args, "99"])
        for run in range(args.runs):
            order = ("bare", "ours") if run % 2 == 0 else ("ours", "bare")
            for name in order:
                with CpuWatch(pids) as watch:
                    res = wrk(
                        urls[name], lua, args.duration, args.connections, [*zipf_args, str(run)]
                    )
                noise.append(watch.other_cores)
                if res["non_2xx"] or res["socket_errors"]:
                    print(f"  warning: {name}: {res}", flush=True)
                closed[name].append(res["rps"])
            print(
                f"closed loop run {run + 1}: bare {closed['bare'][-1]:,.0f}/s, "
                f"ours {closed['ours'][-1]:,.0f}/s",
                flush=True,
            )
        bare_max = median(closed["bare"])
        for fraction in args.rates:
            rate = fraction * bare_max
            for run in range(args.runs):
                order = ("bare", "ours") if run % 2 == 0 else ("ours", "bare")
                for name in order:
                    port = bare_port if name == "bare" else ours_port
                    with CpuWatch(pids) as watch:
                        ol = open_loop(
                            port, rate, args.duration, args.cookies, 100 + run, args.connections
                        )
                    noise.append(watch.other_cores)
                    open_runs.append(
                        {
                            "server": name,
                            "fraction": fraction,
                            "run": run,
                            "other_cores": watch.other_cores,
                            **ol,
                        }
                    )
                    lat = ol["latency"]
                    print(
                        f"open loop {fraction:.2f}x bare ({rate:,.0f}/s) {name}: "
                        f"p50 {lat['p50_ms']:.3f} p99 {lat['p99_ms']:.3f} "
                        f"p99.9 {lat['p99.9_ms']:.3f} max {lat['max_ms']:.3f} ms "
                        f"(generator lag p99 {ol['send_lag']['p99_ms']:.3f} ms, "
                        f"others busy {watch.other_cores:.2f} cores)",
                        flush=True,
                    )
        batch_lua = REPO / "loadtests" / "batch.lua"
        for run in range(args.runs):
            res = wrk(
                urls["ours"],
                batch_lua,
                args.duration,
                8,
                [*zipf_args, str(200 + run), str(args.batch_users), API_KEY],
            )
            if res["non_2xx"]:
                raise RuntimeError(f"batch endpoint refused requests: {res}\n{ours.tail()}")
            batch_runs.append(res)
            print(f"batch run {run + 1}: {res['rps'] * args.batch_users:,.0f} users/s", flush=True)
        ours.stop()
        bare.stop()

    doc = summarise(args, store.memberships, ready_s, closed, open_runs, batch_runs)
    doc["ready_from"] = ready_from
    doc["kafka_running"] = kafka_running
    doc["started_at"] = started
    doc["other_processes_busy_cores"] = {"median": median(noise), "max": max(noise, default=0)}
    write_result("lookup", doc, lambda p: chart(doc, p), args.results)
    print_tables(doc)
    return doc


def summarise(
    args: argparse.Namespace,
    memberships: int,
    ready_s: float,
    closed: dict[str, list[float]],
    open_runs: list[dict[str, Any]],
    batch_runs: list[dict[str, float]],
) -> dict[str, Any]:
    bare_max, ours_max = median(closed["bare"]), median(closed["ours"])
    levels = []
    for fraction in args.rates:
        level: dict[str, Any] = {"fraction_of_bare": fraction, "rate": fraction * bare_max}
        for name in ("bare", "ours"):
            runs = [r for r in open_runs if r["server"] == name and r["fraction"] == fraction]
            level[name] = {k: median([r["latency"][k] for r in runs]) for k in PERCENTILE_KEYS}
            level[name]["generator_lag_p99_ms"] = median([r["send_lag"]["p99_ms"] for r in runs])
            level[name]["errors"] = sum(r["errors"] + r["unanswered"] for r in runs)
        levels.append(level)
    half = min(levels, key=lambda lv: abs(lv["fraction_of_bare"] - 0.5)) if levels else None
    batch_users = median([r["rps"] for r in batch_runs]) * args.batch_users
    ratio = ours_max / bare_max if bare_max else float("nan")
    p99_half = half["ours"]["p99_ms"] if half else float("nan")
    return {
        "test": "lookup",
        "params": {
            "cookies": args.cookies,
            "segments": args.segments,
            "partitions": args.partitions,
            "memberships": memberships,
            "runs": args.runs,
            "duration_s": args.duration,
            "connections": args.connections,
            "batch_users": args.batch_users,
            "zipf_exponent": 1.0,
            "server_core": SERVER_CORE,
            "client_core": CLIENT_CORE,
        },
        "ready_seconds": ready_s,
        "closed_loop": {
            "runs": closed,
            "bare_rps": bare_max,
            "ours_rps": ours_max,
            "ratio": ratio,
        },
        "open_loop": levels,
        "batch": {
            "runs_rps": [r["rps"] for r in batch_runs],
            "user_lookups_per_s": batch_users,
        },
        "budgets": {
            "throughput_ratio_at_least_0.8": ratio >= THROUGHPUT_BUDGET,
            "p99_at_half_bare_at_most_2ms": p99_half <= P99_BUDGET_MS,
            "batch_at_least_50000_users_per_s": batch_users >= BATCH_BUDGET,
        },
    }


def print_tables(doc: dict[str, Any]) -> None:
    c = doc["closed_loop"]
    print()
    print(
        table(
            ["closed loop", "bare req/s", "ours req/s", "ours/bare"],
            [["median", c["bare_rps"], c["ours_rps"], c["ratio"]]],
        )
    )
    rows = []
    for lv in doc["open_loop"]:
        for name in ("bare", "ours"):
            s = lv[name]
            rows.append(
                [
                    f"{lv['fraction_of_bare']:.2f}",
                    lv["rate"],
                    name,
                    s["p50_ms"],
                    s["p99_ms"],
                    s["p99.9_ms"],
                    s["max_ms"],
                    s["generator_lag_p99_ms"],
                    s["errors"],
                ]
            )
    print()
    print(
        table(
            [
                "x bare",
                "req/s",
                "server",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "gen lag",
                "err",
            ],
            rows,
        )
    )
    print()
    print(f"batch: {doc['batch']['user_lookups_per_s']:,.0f} user lookups/s (one core)")
    print(f"ready after {doc['ready_seconds']:.1f}s (from {doc.get('ready_from', 'bitmaps')})")
    other = doc.get("other_processes_busy_cores", {})
    if other:
        print(
            f"other processes on the machine: median {other['median']:.2f}, "
            f"max {other['max']:.2f} cores busy during measurements"
        )
    for name, ok in doc["budgets"].items():
        print(f"budget {name}: {'met' if ok else 'NOT met'}")


def chart(doc: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    c = doc["closed_loop"]
    left.bar(["bare aiohttp", "dmp lookup"], [c["bare_rps"], c["ours_rps"]], color=["#999", "#37c"])
    left.set_ylabel("requests/s (closed loop, wrk, one core)")
    left.set_title(f"max throughput: ours/bare = {c['ratio']:.2f}")
    for name, color in (("bare", "#999"), ("ours", "#37c")):
        rates = [lv["rate"] for lv in doc["open_loop"]]
        right.plot(rates, [lv[name]["p99_ms"] for lv in doc["open_loop"]], "o-", color=color,
                   label=f"{name} p99")  # fmt: skip
        right.plot(rates, [lv[name]["p50_ms"] for lv in doc["open_loop"]], "x--", color=color,
                   label=f"{name} p50")  # fmt: skip
    right.axhline(P99_BUDGET_MS, color="r", lw=0.8, ls=":", label="p99 budget")
    right.set_xlabel("offered load, requests/s (open loop)")
    right.set_ylabel("latency, ms")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title("latency against load")
    p = doc["params"]
    fig.suptitle(f"lookup: {p['cookies']:,} cookies, {p['segments']:,} segments")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_sigterm()
    main()
