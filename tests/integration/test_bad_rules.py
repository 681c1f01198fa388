"""A bad rule file is refused with file:line and nothing else changes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dmp.config import Settings

CASES = {
    "syntax": ("segments:\n  - id: a\n    rule: {within: 1d\n", ":4:1: YAML syntax error"),
    "unknown_field": (
        "segments:\n  - id: a\n    rule: {within: 1d, where: {field: geo.metr0, equals: x}}\n",
        ":3:39: unknown field 'geo.metr0'",
    ),
    "missing_ref": (
        "segments:\n  - id: a\n    of: {and: [ghost]}\n",
        ":3:16: segment 'a' refers to 'ghost', which is not defined",
    ),
    "cycle": (
        "segments:\n"
        "  - id: b\n    rule: {within: 1d, where: {field: type, equals: click}}\n"
        "  - id: x\n    of: {and: [b, y]}\n"
        "  - id: y\n    of: {and: [b, x]}\n",
        ":7:19: segments refer to each other in a cycle: x -> y -> x",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_rule_file_is_refused_and_nothing_changes(
    case: str, tmp_path: Path, settings: Settings, redis_client: aioredis.Redis
) -> None:
    text, expected = CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    env = {
        "PATH": "/usr/bin:/bin",
        "DMP_REDIS_URL": settings.redis.url,
        "DMP_KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
        "DMP_KAFKA_TOPIC": settings.kafka.topic,
        "DMP_REDIS_KEY_PREFIX": settings.redis.key_prefix,
    }
    for command in (["rules", "validate", str(path)], ["--rules", str(path), "ingest"]):
        done = subprocess.run(
            [sys.executable, "-m", "dmp.cli", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode != 0
        assert f"{path}{expected}" in done.stderr
    # The refused ingest never touched the store.
    keys = [k async for k in redis_client.scan_iter(match=f"{settings.redis.key_prefix}:*")]
    assert keys == []
