"""The dead-letter topic: every refused event, with its reason, so nothing is silently lost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer

# Keep the DLQ under Kafka's default 1 MB request limit; the headers say it was cut.
MAX_DLQ_VALUE = 512 * 1024


@dataclass(frozen=True)
class Rejected:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str


def reason_class(reason: str) -> str:
    """A bounded label for metrics (the full reason travels in the DLQ header)."""
    for prefix, label in (
        ("invalid JSON", "invalid_json"),
        ("event is", "too_large"),
        ("ts ", "bad_timestamp"),
        ("missing Kafka key", "bad_key"),
        ("Kafka key", "bad_key"),
        ("empty", "empty"),
    ):
        if reason.startswith(prefix):
            return label
    return "schema"


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, rejected: Sequence[Rejected]) -> None:
        """Send all and wait for the broker's acks (before the batch's offsets are stored)."""
        pending = []
        for r in rejected:
            value = r.value or b""
            headers = [
                ("dmp-reason", r.reason.encode("utf-8")),
                ("dmp-source", f"{r.topic}:{r.partition}:{r.offset}".encode()),
            ]
            if len(value) > MAX_DLQ_VALUE:
                headers.append(("dmp-truncated-from", str(len(value)).encode()))
                value = value[:MAX_DLQ_VALUE]
            pending.append(
                await self.producer.send(self.topic, value=value, key=r.key, headers=headers)
            )
        await asyncio.gather(*pending)
