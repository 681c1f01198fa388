"""Numbered, kept rule-set versions in Redis, and the watcher that hot-reloads them.

A version is applied whole: its text is validated before it is stored, and services swap
the compiled program in one assignment between two batches or two requests, so nothing
ever sees half of a version. Rolling back is applying an older version's text again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from dmp.redis_types import as_str
from segment_rules import CompiledRules, RuleSet, parse_rules
from segment_rules.yaml_source import parse_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleVersion:
    number: int
    sha256: str
    source: str
    applied_at: float
    text: str


class RuleVersions:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self._versions = f"{prefix}:rules:versions"  # hash: number -> json document
        self._active = f"{prefix}:rules:active"
        self._counter = f"{prefix}:rules:counter"

    async def apply(self, text: str, source: str) -> RuleVersion:
        """Validate (raises RuleFileError, nothing stored) then store and activate."""
        ruleset = parse_rules(text, source)
        number = int(await self.client.incr(self._counter))
        version = RuleVersion(number, ruleset.version, source, time.time(), text)
        doc = orjson.dumps(
            {
                "sha256": version.sha256,
                "source": source,
                "applied_at": version.applied_at,
                "text": text,
            }
        )
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._versions, str(number), doc)
            pipe.set(self._active, number)
            await pipe.execute()
        return version

    async def rollback(self, to: int | None = None) -> RuleVersion:
        """Re-apply version ``to`` (default: the one before the active one) as a new number."""
        _, old = await self.rollback_target(to)
        return await self.reapply(old)

    async def reapply(self, old: RuleVersion) -> RuleVersion:
        """Apply ``old``'s text again as a new number (what a rollback to it does)."""
        return await self.apply(old.text, f"rollback to {old.number} ({old.source})")

    async def rollback_target(self, to: int | None = None) -> tuple[RuleVersion, RuleVersion]:
        """(the active version, the one a rollback to ``to`` would apply again)."""
        active = await self.active()
        if active is None:
            raise LookupError("no rule version has been applied yet")
        target = to if to is not None else active.number - 1
        old = await self.get(target)
        if old is None:
            raise LookupError(f"there is no rule version {target}")
        return active, old

    async def active_number(self) -> int | None:
        raw = await self.client.get(self._active)
        return int(raw) if raw is not None else None

    async def active(self) -> RuleVersion | None:
        number = await self.active_number()
        return await self.get(number) if number is not None else None

    async def get(self, number: int) -> RuleVersion | None:
        raw = await self.client.hget(self._versions, str(number))
        if raw is None:
            return None
        doc = orjson.loads(raw)
        return RuleVersion(number, doc["sha256"], doc["source"], doc["applied_at"], doc["text"])

    async def list(self) -> list[RuleVersion]:
        raw: Any = await self.client.hgetall(self._versions)
        versions = []
        for number, doc_raw in raw.items():
            doc = orjson.loads(doc_raw)
            versions.append(
                RuleVersion(
                    int(as_str(number)),
                    doc["sha256"],
                    doc["source"],
                    doc["applied_at"],
                    doc["text"],
                )
            )
        return sorted(versions, key=lambda v: v.number)


class RuleWatcher:
    """Polls the active version and hands each new compiled program to ``on_change``."""

    def __init__(
        self,
        versions: RuleVersions,
        current: CompiledRules,
        on_change: Callable[[CompiledRules, int], None],
    ) -> None:
        self.versions = versions
        self.current_sha = current.version
        self.active_number: int | None = None
        self.on_change = on_change

    async def poll(self) -> bool:
        """True when a new version was swapped in."""
        number = await self.versions.active_number()
        if number is None or number == self.active_number:
            return False
        version = await self.versions.get(number)
        if version is None:
            return False
        self.active_number = number
        if version.sha256 == self.current_sha:
            return False
        compiled = CompiledRules(parse_rules(version.text, f"rules v{number}"))
        self.current_sha = compiled.version
        self.on_change(compiled, number)
        log.info("rule set v%d (%s) now in force", number, version.sha256[:12])
        return True


def diff_rules(old_text: str, new_text: str) -> list[str]:
    """Human-readable lines: segments added, removed and changed (with the keys that changed)."""
    old, new = _segments_by_id(old_text), _segments_by_id(new_text)
    lines = [f"+ {sid}: added" for sid in new if sid not in old]
    lines += [f"- {sid}: removed" for sid in old if sid not in new]
    for sid in new:
        if sid in old and old[sid] != new[sid]:
            keys = sorted(
                k for k in set(old[sid]) | set(new[sid]) if old[sid].get(k) != new[sid].get(k)
            )
            lines.append(f"~ {sid}: changed {', '.join(keys)}")
    return lines


def _segments_by_id(text: str) -> dict[str, dict[str, Any]]:
    doc = parse_yaml(text, "<diff>").plain()
    return {s["id"]: s for s in doc.get("segments", []) if isinstance(s, dict) and "id" in s}


def describe_ruleset(ruleset: RuleSet) -> str:
    return f"{len(ruleset.segments)} segments, version {ruleset.version[:12]}"
