"""``dmp rules backfill SEGMENT --abandon``: a backfill that cannot finish is dropped.

A backfill staged on every partition, merged by partition 0's owner, refused on partition
1 (its manifest's error, the way an owner refuses a stage whose traits the live rules no
longer have): re-running cannot finish it, and `dmp rules apply` refuses the segment.
Abandoning removes every key the job wrote, leaves what merged in place, and then apply
takes the segment, and a fresh backfill over another period starts over and completes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from dmp.audience import Audience
from dmp.backfill_job import activate
from dmp.backfill_merge import Manifest
from dmp.backfill_status import unfinished_backfills
from dmp.config import Settings
from dmp.keys import PartitionKeys, partitions_key
from dmp.redis_types import as_bytes, as_str
from dmp.rule_versions import RuleVersions
from segment_rules import CompiledRules, parse_rules
from tests.integration.conftest import StartIngest
from tests.integration.test_backfill import (
    V1,
    V2,
    applied_offsets,
    click,
    dmp_cli,
    produce_at_event_time,
)
from tests.integration.test_backfill_crash import wait_marked

JOB = "clickers@2"
REFUSAL = "the live rule version no longer has the traits ['t']"


async def job_keys(client: aioredis.Redis, settings: Settings) -> list[str]:
    """Every key and hash field the job wrote, on any partition."""
    found = []
    for p in range(settings.kafka.partitions):
        keys = PartitionKeys(settings.redis.key_prefix, settings.kafka.topic, p)
        if await client.hexists(keys.backfill_stages, JOB):
            found.append(f"{keys.backfill_stages} {JOB}")
        done = await client.hgetall(keys.backfilled)
        for name, value in done.items():
            field = as_str(name)
            if field == JOB or (field.startswith("trait:") and orjson.loads(value)["job"] == JOB):
                found.append(f"{keys.backfilled} {field}")
        pattern = f"{keys.tag}:backfill:{JOB}:*"
        found += sorted([as_str(k) async for k in client.scan_iter(match=pattern)])
    return found


@pytest.mark.timeout(180)
async def test_abandon_clears_a_refused_half_merged_backfill_and_a_fresh_one_completes(
    settings: Settings,
    start_ingest: StartIngest,
    producer: AIOKafkaProducer,
    redis_client: aioredis.Redis,
    tmp_path: Path,
) -> None:
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    parts = [PartitionKeys(prefix, topic, p) for p in range(settings.kafka.partitions)]
    versions = RuleVersions(redis_client, prefix)
    await versions.apply(V1, "v1.yaml")
    ingest = await start_ingest()
    # 'ancient' clicks are older than the 8 days of the first run, inside the 12 of the
    # fresh one (and the rule's 14).
    ancient = [f"ancient-{n}" for n in range(6)]
    history = [f"hist-{n}" for n in range(40)]
    events = [click(u, age) for u in ancient for age in (11, 10)]
    events += [click(u, age) for u in history for age in (5, 3)]
    await produce_at_event_time(producer, topic, events)
    async with asyncio.timeout(20):
        while await applied_offsets(redis_client, settings) < len(events):
            await asyncio.sleep(0.05)
    await versions.apply(V2, "v2.yaml")  # clickers paused
    await wait_marked(redis_client, settings, 2)

    # Staged with no owner merging, then partition 1's stage refused, then owners back:
    # partition 0 merges, partition 1 never will.
    await ingest.stop()
    backfill = ("rules", "backfill", "clickers")
    code, _, err = await dmp_cli(
        settings, *backfill, "--days", "8", "--chunk-events", "5", "--merge-timeout", "1"
    )
    assert code == 1, err
    assert "have not merged their history" in err
    raw = await redis_client.hget(parts[1].backfill_stages, JOB)
    assert raw is not None
    refused = Manifest.decode(as_bytes(raw))
    assert refused.partitions == [0, 1], refused  # what the job was staged for
    assert refused.chunks > 1, refused
    refused.error = REFUSAL
    await redis_client.hset(parts[1].backfill_stages, JOB, refused.encode())
    ingest = await start_ingest()
    async with asyncio.timeout(30):
        while not await redis_client.hexists(parts[0].backfilled, JOB):
            await asyncio.sleep(0.05)
    written = await job_keys(redis_client, settings)
    assert f"{parts[0].backfilled} {JOB}" in written
    assert any(f"{parts[0].backfilled} trait:" in k for k in written), written
    assert f"{parts[1].backfill_stages} {JOB}" in written
    assert sum(f"{parts[1].tag}:backfill:{JOB}:" in k for k in written) == refused.chunks

    # Stuck: the re-run cannot finish it, apply refuses the segment; both name --abandon.
    code, _, err = await dmp_cli(settings, *backfill, "--days", "8", "--merge-timeout", "5")
    assert code == 1, err
    assert f"partition 1 refused the backfill: {REFUSAL}" in err
    assert "`dmp rules backfill clickers --abandon` drops the job" in err
    live_text = tmp_path / "clickers-live.yaml"
    live_text.write_text(activate(V2, parse_rules(V2), "clickers"))
    code, _, err = await dmp_cli(settings, "rules", "apply", str(live_text))
    assert code == 1, err
    assert "would go live half backfilled" in err
    assert "or `dmp rules backfill clickers --abandon` to drop the job" in err
    assert (await versions.active_number()) == 2

    audience = Audience(redis_client, prefix, topic, CompiledRules(parse_rules(V2)))
    built = await audience.estimate("clickers")
    assert 0 < built < len(history), built  # partition 0's history merged, not partition 1's
    code, out, err = await dmp_cli(settings, *backfill, "--abandon")
    assert code == 0, err
    assert out.startswith(
        f"abandoning backfill {JOB} is merged on partitions [0] of [0, 1], still merging on "
        f"[1], refused: partition 1: {REFUSAL}\n"
    ), out
    assert f"  partition 0: removed merged marker {JOB}; trait marks trait:" in out
    assert (
        f"  partition 1: removed stage {JOB} (0 of {refused.chunks} chunks merged, refused: "
        f"{REFUSAL}); {refused.chunks} unmerged chunks\n"
    ) in out
    assert "What was merged stays in the store (partitions [0]); 'clickers' stays paused" in out
    assert await job_keys(redis_client, settings) == []
    assert await audience.estimate("clickers") == built  # merged data untouched
    assert (await versions.active_number()) == 2  # still paused

    code, out, err = await dmp_cli(settings, *backfill, "--abandon")  # idempotent
    assert code == 0, err
    assert out == "clickers: no unfinished backfill: nothing to abandon\n"

    # Apply no longer refuses it.
    code, out, err = await dmp_cli(settings, "rules", "apply", str(live_text))
    assert code == 0, err
    assert "as version 3" in out

    # Paused again, a fresh backfill over another period starts over and completes.
    await versions.apply(V2, "v2.yaml")  # version 4
    await wait_marked(redis_client, settings, 4)
    code, out, err = await dmp_cli(settings, *backfill, "--days", "12", "--merge-timeout", "30")
    assert code == 0, err
    assert "resuming" not in err
    assert "version 5 is live: 'clickers' active" in out
    assert await audience.estimate("clickers") == len(history) + len(ancient)
    for keys in parts:
        assert await redis_client.hexists(keys.backfilled, JOB)
        assert not await redis_client.hexists(keys.backfill_stages, JOB)


async def test_a_finished_job_stays_finished_when_partitions_are_added_later(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    """Merged on the partitions it was staged for ([0, 1]); partition 2 came afterwards."""
    prefix, topic = settings.redis.key_prefix, settings.kafka.topic
    await redis_client.sadd(partitions_key(prefix, topic), "0", "1", "2")
    summary = {"events": 3, "merged": 3, "at": 1.0, "partitions": [0, 1]}
    for p in (0, 1):
        keys = PartitionKeys(prefix, topic, p)
        await redis_client.hset(keys.backfilled, JOB, orjson.dumps(summary))
    assert await unfinished_backfills(redis_client, prefix, topic) == []
    # Written before summaries named their partitions: the topic's partitions now.
    old = {"events": 3, "merged": 3, "at": 1.0}
    await redis_client.hset(PartitionKeys(prefix, topic, 0).backfilled, "b@1", orjson.dumps(old))
    [unfinished] = await unfinished_backfills(redis_client, prefix, topic)
    assert (
        unfinished.describe()
        == "backfill b@1 is merged on partitions [0] of [0, 1, 2], not staged on [1, 2]"
    )
    code, out, err = await dmp_cli(settings, "rules", "backfill", "b", "--abandon")
    assert code == 0, err
    assert "  partition 0: removed merged marker b@1\n" in out
    assert "What was merged stays in the store (partitions [0]); 'b' stays paused" in out
    assert await unfinished_backfills(redis_client, prefix, topic) == []
    assert await redis_client.hexists(PartitionKeys(prefix, topic, 1).backfilled, JOB)
