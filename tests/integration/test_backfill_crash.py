"""A crash between two backfill merge chunks, with real processes on the real stack.

`dmp ingest` (which merges the staged history, one chunk per transaction) and the
`dmp rules backfill` command are SIGKILLed after some chunks merged and before the rest.
Then: the segment is still paused and lookups never answer it, though part of its history
is merged; `dmp rules apply` refuses to make it live half merged; and running the same
backfill again (with ingest restarted) ends in exactly the state of a backfill that was
never interrupted, run beside it on the same topic under another key prefix.
The refusals of a half-merged job (rollback, a resume over another period) are tested
without processes, on a stage written by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from pytest_aiohttp import AiohttpClient

from dmp.audience import Audience
from dmp.backfill_job import activate
from dmp.backfill_merge import Manifest
from dmp.config import Settings
from dmp.keys import PartitionKeys, partitions_key
from dmp.lookup import REPLICA, create_lookup_app
from dmp.redis_types import as_bytes
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules, parse_rules
from tests.faults.conftest import run_as_other
from tests.faults.support import (
    Process,
    delete_keys,
    service_env,
    started,
    state_snapshot,
    summarize_difference,
    wait_applied,
)
from tests.integration.conftest import StartIngest, wait_lookup_ready
from tests.integration.helpers import segments_of
from tests.integration.test_backfill import (
    V1,
    V2,
    cli_command,
    cli_env,
    click,
    dmp_cli,
    produce_at_event_time,
)

JOB = "clickers@2"
CHUNK = 20  # history events per merge transaction: about a dozen chunks per partition
BACKFILL = ("rules", "backfill", "clickers", "--days", "8", "--chunk-events", str(CHUNK))


async def stages(client: aioredis.Redis, settings: Settings) -> dict[int, Manifest | None]:
    """Per partition: the job's stage still merging, or None (merged, or never staged)."""
    found: dict[int, Manifest | None] = {}
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        raw = await client.hget(keys.backfill_stages, JOB)
        found[p] = None if raw is None else Manifest.decode(as_bytes(raw))
    return found


async def merged_partitions(client: aioredis.Redis, settings: Settings) -> set[int]:
    done = set()
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        if await client.hexists(keys.backfilled, JOB):
            done.add(p)
    return done


async def wait_marked(client: aioredis.Redis, settings: Settings, version: int) -> None:
    """Until every partition's ingest owner has taken rule ``version`` (its live-from mark)."""
    marks = [
        PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p).rules_from
        for p in range(settings.kafka.partitions)
    ]
    async with asyncio.timeout(20):
        while not all([await client.hexists(m, str(version)) for m in marks]):
            await asyncio.sleep(0.05)


async def comparable_state(client: aioredis.Redis, prefix: str) -> dict[str, object]:
    """Everything the run stored (tests/faults/support.py), less what names wall-clock
    times: the rule versions (applied at) and the backfill summaries' finishing time."""
    state = await state_snapshot(client, prefix)
    for name in [n for n in state if n.startswith(":rules:")]:
        del state[name]
    for name, value in state.items():
        if name.endswith(":backfilled"):
            assert isinstance(value, dict)
            summaries = {k: orjson.loads(v) for k, v in value.items()}
            for summary in summaries.values():
                summary.pop("at", None)
            state[name] = summaries
    return state


@pytest.mark.timeout(240)
async def test_a_crash_between_merge_chunks_stays_paused_and_a_rerun_ends_as_a_clean_run(
    settings: Settings,
    rules: CompiledRules,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    # A short session: the restarted ingest gets the killed one's partitions within seconds.
    s = replace(
        settings,
        kafka=replace(settings.kafka, session_timeout_ms=3000, heartbeat_interval_ms=500),
    )
    clean = run_as_other(s, "clean")  # same topic, its own group and keys
    topic = s.kafka.topic
    # Each merge chunk waits for a loop turn of ingest: an idle poll of 0.3 s gives the test
    # time to kill it between two chunks.
    ingest_env = service_env(s, DMP_KAFKA_POLL_TIMEOUT_MS="300", DMP_LOG_LEVEL="INFO")
    ingest = Process("ingest", ingest_env, tmp_path / "ingest-1.log")
    backfill: asyncio.subprocess.Process | None = None
    restarted: Process | None = None
    watching: asyncio.Task[None] | None = None
    try:
        for run in (s, clean):
            await RuleVersions(redis_client, run.redis.key_prefix).apply(V1, "v1.yaml")
        await started(ingest)
        clean_ingest = await start_ingest(s=clean)

        # History: each cookie's two clicks next to each other, so every merged chunk
        # completes members; 'once' cookies click once (never members).
        history = [f"hist-{n}" for n in range(240)]
        once = [f"once-{n}" for n in range(20)]
        events = [click(u, age) for u in history for age in (5, 3)]
        events += [click(u, 4) for u in once]
        await produce_at_event_time(producer, topic, events)
        for run in (s, clean):
            await wait_applied(redis_client, run, len(events), timeout=60)
            await RuleVersions(redis_client, run.redis.key_prefix).apply(V2, "v2.yaml")
        for run in (s, clean):  # both ingests took v2: the events before are history
            await wait_marked(redis_client, run, 2)
        live = [f"live-{n}" for n in range(5)]
        more = [click(u, a) for u in live for a in (0.2, 0.1)]
        await produce_at_event_time(producer, topic, more)
        for run in (s, clean):
            await wait_applied(redis_client, run, len(events) + len(more), timeout=60)
        full = set(history + live)
        everyone = [*history, *once, *live]

        # Lookups of the interrupted run, watched all through.
        app = create_lookup_app(s, rules)
        client = await aiohttp_client(app)
        await wait_lookup_ready(app, 10)
        views: set[frozenset[str]] = set()

        async def watch() -> None:
            while True:
                answered = (u for u in everyone if "clickers" in app[REPLICA].segments(u))
                views.add(frozenset(answered))
                await asyncio.sleep(0.005)

        watching = asyncio.create_task(watch())

        # The uninterrupted run.
        code, out, err = await dmp_cli(clean, *BACKFILL)
        assert code == 0, err
        assert "version 3 is live: 'clickers' active" in out

        # The interrupted one: kill ingest (the merger) and the command between two chunks.
        backfill = await asyncio.create_subprocess_exec(
            *cli_command(*BACKFILL),
            env=cli_env(s),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            while not any(m and m.next >= 2 for m in (await stages(redis_client, s)).values()):
                assert backfill.returncode is None
                assert ingest.alive, ingest.output()[-3000:]
                await asyncio.sleep(0.005)
        await ingest.kill()
        backfill.kill()
        await backfill.wait()

        left = await stages(redis_client, s)
        merged_chunks = sum(m.next for m in left.values() if m is not None)
        waiting = sorted(p for p, m in left.items() if m is not None and m.next < m.chunks)
        assert merged_chunks >= 2, left
        assert waiting, left  # chunks are left to merge: the kill fell between two of them
        assert await merged_partitions(redis_client, s) != set(range(s.kafka.partitions))
        audience = Audience(redis_client, s.redis.key_prefix, topic, CompiledRules(parse_rules(V2)))
        partial = await audience.estimate("clickers")
        assert len(live) < partial < len(full), partial  # part of the history is merged...
        members = await audience.sample("clickers", 50)
        assert set(members) - set(live)
        for uid in members:  # ... and none of it is answered
            assert "clickers" not in await segments_of(client, uid)
        assert (await RuleVersions(redis_client, s.redis.key_prefix).active_number()) == 2

        # Making it live by hand now is refused.
        live_text = tmp_path / "clickers-live.yaml"
        live_text.write_text(activate(V2, parse_rules(V2), "clickers"))
        code, _, err = await dmp_cli(s, "rules", "apply", str(live_text))
        assert code == 1, err
        assert (
            "error: 'clickers' would go live half backfilled: backfill clickers@2 is merged" in err
        )
        assert f"still merging on {waiting}" in err
        assert "Run `dmp rules backfill clickers --days 8` again" in err
        assert (await RuleVersions(redis_client, s.redis.key_prefix).active_number()) == 2

        # Ingest back, the same command again: it finishes the merge and goes live.
        restarted = Process("ingest", ingest_env, tmp_path / "ingest-2.log")
        await started(restarted)
        code, out, err = await dmp_cli(s, *BACKFILL)
        assert code == 0, err
        assert f"resuming {JOB}: 2 partitions already staged" in err
        assert "version 3 is live: 'clickers' active" in out
        async with asyncio.timeout(10):
            while "clickers" not in await segments_of(client, history[0]):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

        # Lookups saw nobody, then everybody: never a part.
        assert views == {frozenset(), frozenset(full)}, [len(v) for v in views]
        assert await merged_partitions(redis_client, s) == set(range(s.kafka.partitions))
        assert all(m is None for m in (await stages(redis_client, s)).values())
        assert await audience.estimate("clickers") == len(full)

        for run in (s, clean):  # both ingests took the live version (their last mark)
            await wait_marked(redis_client, run, 3)
        await clean_ingest.stop()
        interrupted_state = await comparable_state(redis_client, s.redis.key_prefix)
        clean_state = await comparable_state(redis_client, clean.redis.key_prefix)
        assert interrupted_state == clean_state, summarize_difference(
            interrupted_state, clean_state
        )
        assert any(":bm:clickers:" in name for name in clean_state)
        print(
            f"killed after {merged_chunks} merged chunks ({partial} of {len(full)} members "
            f"built); the re-run ended identical to a clean run ({len(clean_state)} keys)"
        )
    finally:
        if watching is not None:
            watching.cancel()
        if backfill is not None and backfill.returncode is None:
            backfill.kill()
            await backfill.wait()
        for proc in (ingest, restarted):
            if proc is not None and proc.alive:
                await proc.kill()
        await delete_keys(redis_client, f"{clean.redis.key_prefix}:")


async def test_a_half_merged_job_refuses_a_rollback_to_it_live_and_a_resume_over_another_period(
    settings: Settings, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """Partition 0 has the job staged (8 days), partition 1 nothing yet; no ingest runs."""
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    versions = RuleVersions(redis_client, prefix)
    await versions.apply(V1, "v1.yaml")
    await versions.apply(V2, "v2.yaml")  # clickers paused: the job is clickers@2
    parts = [PartitionKeys(prefix, topic, p) for p in range(settings.kafka.partitions)]
    await redis_client.sadd(partitions_key(prefix, topic), *[str(k.partition) for k in parts])
    for keys in parts:  # where each partition's owner took v2 (as ingest would mark it)
        await redis_client.hset(keys.rules_from, "2", 100)
    stage = Manifest(JOB, "clickers", 3, 1, ["t"], 50, 8.0)
    await redis_client.hset(parts[0].backfill_stages, JOB, stage.encode())

    # Resumed over another period: partition 1 would read 30 days, partition 0 has 8.
    code, _, err = await dmp_cli(
        settings, *BACKFILL[:3], "--days", "30", "--wait", "5", "--merge-timeout", "1"
    )
    assert code == 1, err
    assert (
        f"error: {JOB} was started with --days 8 on partitions [0]: resumed with --days 30" in err
    )
    assert (
        "Run it again with --days 8, or `dmp rules backfill clickers --abandon` to start over. "
        "Nothing was changed."
    ) in err
    assert not await redis_client.hexists(parts[1].backfill_stages, JOB)
    assert (await versions.active_number()) == 2

    # Made live by hand (--force), paused again: a rollback to the live version is refused.
    live_text = tmp_path / "clickers-live.yaml"
    live_text.write_text(activate(V2, parse_rules(V2), "clickers"))
    code, _, err = await dmp_cli(settings, "rules", "apply", str(live_text))
    assert code == 1
    assert "Run `dmp rules backfill clickers --days 8` again" in err
    assert "or `dmp rules backfill clickers --abandon` to drop the job" in err
    code, out, err = await dmp_cli(settings, "rules", "apply", "--force", str(live_text))
    assert code == 0, err
    await versions.apply(V2, "v2.yaml")  # version 4: paused again
    code, _, err = await dmp_cli(settings, "rules", "rollback")
    assert code == 1, err
    assert "error: 'clickers' would go live half backfilled: backfill clickers@2 is" in err
    assert "still merging on [0], not staged on [1]" in err
    assert (await versions.active_number()) == 4
    code, out, err = await dmp_cli(settings, "rules", "rollback", "--force")
    assert code == 0, err
    assert "version 5 is live: rollback to 3 (" in out
