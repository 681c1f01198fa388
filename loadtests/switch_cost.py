"""What a destination's switch of live sets costs the `dmp destinations` process and Redis.

    python -m loadtests.switch_cost [--members 200000] [--others 200000] [--partitions 4]
                                    [--runs 2] [--old-commit REV]

Writes ``--members`` cookies in intent and geo_socal (paused) and ``--others`` in intent
only, over ``--partitions`` partitions, in the store's layout (PartitionStore commits, as
ingest writes them) under a fresh prefix of the configured Redis. Then, each in a fresh
process, ``start_switch`` makes geo_socal live for a partner granted it plainly (batches of
500) with dmp/destinations_switch.py as it is and, given ``--old-commit REV`` (read from
git; needs the history, e.g. ``78b3b4f`` for the switch before it was bounded), with that
version too, alternating. Per run: wall and CPU seconds of ``start_switch``; peak
RSS above the RSS before it (``VmHWM`` reset through ``/proc/self/clear_refs``); the longest
the event loop went without running another task (a 5 ms ticker); and the largest write
transaction (bytes of arguments, client-side seconds of its EXEC); how many scans of the
key names it made (``scan_iter`` walks of the database) and ``SCAN`` commands. Prints a table and
writes results/switch_cost.json. Everything written is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from bidder_adapter.partner_file import parse_partner_bytes
from dmp.cookie_state import CookieState
from dmp.destinations_keys import DestinationKeys
from dmp.ids import uid_hash
from dmp.keys import PartitionKeys
from dmp.partition_batch import BatchPlan
from dmp.partition_store import PartitionStore
from dmp.redis_client import scan_batches
from loadtests.common import REPO, RESULTS, python_argv, stack_urls
from segment_rules import CompiledRules, parse_rules

RULES = (REPO / "segment_rules" / "examples" / "segments.yaml").read_text()
PAUSED = RULES.replace("  - id: geo_socal\n", "  - id: geo_socal\n    status: paused\n", 1)
TOPIC = "bench"
COMMIT_STATES = 20_000
PARTNER = """partners:
  - partner_id: bench-dsp
    kind: dsp
    api_key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    granted_segments: [auto_new_car_intent, geo_socal]
    output_format: ids
    segtax: 700
    data_provider_id: dmp.example
    data_provider_name: Example DMP
    max_segments: 5
    user_id_sources: [cookie]
    destination: {kind: http, url: 'http://unused', batch_size: 500}
"""


def vm(field: str) -> int:
    """A ``/proc/self/status`` figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Set ``VmHWM`` to the current RSS (Linux), and return that."""
    Path("/proc/self/clear_refs").write_text("5")
    return vm("VmRSS")


async def populate(url: str, prefix: str, members: int, others: int, partitions: int) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        both = frozenset({"auto_new_car_intent", "geo_socal"})
        intent = frozenset({"auto_new_car_intent"})
        for partition in range(partitions):
            keys = PartitionKeys(prefix, TOPIC, partition)
            store = PartitionStore(client, keys, state_ttl=3 * 86400, stream_maxlen=100_000)
            await store.load()
            mine = [f"m{n}" for n in range(partition, members, partitions)]
            mine += [f"o{n}" for n in range(partition, others, partitions)]
            for first in range(0, len(mine), COMMIT_STATES):
                plan = BatchPlan(next_local=min(len(mine), first + COMMIT_STATES))
                for local in range(first, plan.next_local):
                    uid = mine[local]
                    held = both if uid.startswith("m") else intent
                    plan.states[uid] = CookieState(local, members=held)
                    plan.new_ids.append((local, uid_hash(uid)))
                    for segment in held:
                        plan.added.setdefault(segment, []).append(local)
                await store.commit(plan, plan.next_local, time.time())
    finally:
        await client.aclose()


async def clean(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        async for batch in scan_batches(client, f"{prefix}:*", 1000):
            await client.delete(*batch)
    finally:
        await client.aclose()


def switch_module(commit: str | None) -> types.ModuleType:
    if commit is None:
        from dmp import destinations_switch

        return destinations_switch
    source = subprocess.run(
        ["git", "show", f"{commit}:dmp/destinations_switch.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("old_destinations_switch", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:dmp/destinations_switch.py", "exec"), module.__dict__)
    return module


async def measure(url: str, prefix: str, commit: str | None) -> dict[str, Any]:
    module = switch_module(commit)
    profile = parse_partner_bytes(PARTNER.encode(), "bench.yaml").profiles["bench-dsp"]
    active = CompiledRules(parse_rules(RULES)).ruleset
    paused = CompiledRules(parse_rules(PAUSED)).ruleset
    old = frozenset(s.id for s in paused.segments if s.status == "active")
    new = frozenset(s.id for s in active.segments if s.status == "active")
    client = aioredis.Redis.from_url(url)
    keys = DestinationKeys(prefix, f"dest-{uuid.uuid4().hex[:6]}", profile.partner_id)
    writes: list[tuple[int, float]] = []  # (argument bytes, seconds) per pipeline with a write
    real = Pipeline.execute

    async def execute(self: Pipeline, raise_on_error: bool = True) -> list[Any]:
        size = sum(
            len(a) if isinstance(a, bytes | str) else 8
            for args, _ in self.command_stack
            for a in args
        )
        write = any(str(args[0]) in {"SET", "HSET"} for args, _ in self.command_stack)
        started = time.perf_counter()
        try:
            return await real(self, raise_on_error)
        finally:
            if write:
                writes.append((size, time.perf_counter() - started))

    Pipeline.execute = execute  # type: ignore[method-assign]  # a measuring wrapper
    scans = {"passes": 0, "commands": 0}  # scan_iter walks of the database; SCAN commands
    real_iter, real_scan = aioredis.Redis.scan_iter, aioredis.Redis.scan

    def scan_iter(self: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
        scans["passes"] += 1
        return real_iter(self, *args, **kwargs)

    async def scan(self: aioredis.Redis, *args: Any, **kwargs: Any) -> Any:
        scans["commands"] += 1
        return await real_scan(self, *args, **kwargs)

    aioredis.Redis.scan_iter = scan_iter  # type: ignore[method-assign, assignment]
    aioredis.Redis.scan = scan  # type: ignore[method-assign, assignment]
    stall = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.005)
            last = now

    try:
        await client.ping()
        rss = reset_peak()
        tick = asyncio.create_task(ticker())
        cpu, wall = time.process_time(), time.perf_counter()
        switch, unnamed = await module.start_switch(
            client,
            module.SwitchStore(client, keys),
            prefix=prefix,
            topic=TOPIC,
            ruleset=active,
            profile=profile,
            old=old,
            new=new,
            batch_size=500,
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done.set()
        await tick
        peak = vm("VmHWM")
        lines = 0
        for n in range(switch.chunks):
            lines += len(await module.SwitchStore(client, keys).chunk(n))
        return {
            "code": commit or "working tree",
            "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "rss_before_mb": round(rss / 2**20, 1),
            "peak_rss_above_before_mb": round((peak - rss) / 2**20, 1),
            "longest_event_loop_stall_seconds": round(stall, 3),
            "write_transactions": len(writes),
            "largest_write_transaction_mb": round(
                max((s for s, _ in writes), default=0) / 2**20, 2
            ),
            "largest_write_transaction_seconds": round(max((t for _, t in writes), default=0.0), 3),
            "scan_passes": scans["passes"],
            "scan_commands": scans["commands"],
            "chunks": switch.chunks,
            "lines": lines,
            "unnamed": unnamed,
        }
    finally:
        Pipeline.execute = real  # type: ignore[method-assign]
        aioredis.Redis.scan_iter = real_iter  # type: ignore[method-assign]
        aioredis.Redis.scan = real_scan  # type: ignore[method-assign]
        await clean(url, keys.tag)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=200_000)
    parser.add_argument("--others", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--old-commit", default=None, help="also measure this git revision")
    parser.add_argument("--child", nargs=2, metavar=("PREFIX", "COMMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    url, _ = stack_urls()
    if args.child:
        prefix, commit = args.child
        result = asyncio.run(measure(url, prefix, None if commit == "-" else commit))
        print(json.dumps(result))
        return
    prefix = f"bench-switch-{uuid.uuid4().hex[:8]}"
    results: list[dict[str, Any]] = []
    try:
        started = time.perf_counter()
        asyncio.run(populate(url, prefix, args.members, args.others, args.partitions))
        print(f"populated {prefix} in {time.perf_counter() - started:.1f}s", flush=True)
        for _ in range(args.runs):
            for commit in ([args.old_commit] if args.old_commit else []) + ["-"]:
                child = python_argv("loadtests.switch_cost", "--child", prefix, commit)
                out = subprocess.run(child, cwd=REPO, check=True, capture_output=True, text=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    finally:
        asyncio.run(clean(url, prefix))
    report = {
        "members": args.members,
        "others": args.others,
        "partitions": args.partitions,
        "runs": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "switch_cost.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
