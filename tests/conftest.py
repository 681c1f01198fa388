"""Shared fixtures. Integration tests use the real Kafka and Redis that deploy/ starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from dmp.config import Settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_RULES = REPO / "segment_rules" / "examples" / "segments.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings.from_env(os.environ)


async def delete_topics(settings: Settings) -> None:
    """Remove a test's event and dead-letter topics from the real broker."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([settings.kafka.topic, settings.kafka.dead_letter_topic])
    finally:
        await admin.close()
