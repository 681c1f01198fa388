"""Create the Kafka topics the DMP uses (idempotent)."""

from __future__ import annotations

import contextlib
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from dmp.auth_transport import kafka_security_options
from dmp.config import KafkaSettings

log = logging.getLogger(__name__)


async def create_topics(kafka: KafkaSettings) -> list[str]:
    """Create the events and dead-letter topics if missing; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka_security_options(kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(kafka.topic, num_partitions=kafka.partitions, replication_factor=1),
            NewTopic(
                kafka.dead_letter_topic,
                num_partitions=1,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(1024 * 1024 + 65536)},
            ),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            # Another process may create them at the same moment.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        for t in missing:
            log.info("created topic %s (%d partitions)", t.name, t.num_partitions)
        return [t.name for t in missing]
    finally:
        await admin.close()
