"""EventPublisher against a real broker: a refused record is never papered over."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.settings import Settings
from topics.publisher import EventPublisher, RecordsLost

pytestmark = pytest.mark.stack


@pytest.fixture()
def topic(live: Settings) -> str:
    """A topic of this test's own (never the pipeline's topics)."""
    name = f"test-output-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": live.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(10)
    return name


async def test_flush_succeeds_when_every_record_is_acknowledged(
    live: Settings, topic: str
) -> None:
    publisher = EventPublisher(live)
    publisher.publish(topic, b"k", b"{}")
    await publisher.flush(10)


async def test_a_refused_record_raises_records_lost_not_a_retryable_error(
    live: Settings, topic: str
) -> None:
    publisher = EventPublisher(live)
    # Partition 999 does not exist: the record is refused, not merely slow.
    publisher.publish(topic, b"k", b"{}", partition=999)
    with pytest.raises(RecordsLost):
        await publisher.flush(10)
    await publisher.flush(10)  # nothing left queued: a retry would "succeed" silently
