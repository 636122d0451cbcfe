"""A confluent-kafka producer for agent and sink output, flushed before a batch is acknowledged.

Agents produce events and DLQ records here (idempotent producer, acks=all) and call
:meth:`EventPublisher.flush` at the end of each batch, before Faust acks the batch's input
records. So an input offset is committed only after its outputs are durably written.
"""

from __future__ import annotations

import asyncio
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from config.settings import Settings
from schemas.dlq import is_dlq_topic, scrub_record
from topics.kafka_config import producer_config


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge some records of a batch yet (still queued)."""


class RecordsLost(DeliveryFailed):
    """The broker refused some records: they are no longer queued, so flushing again cannot
    bring them back. The batch must not be acknowledged (stop and let it be redelivered)."""


class EventPublisher:
    def __init__(self, settings: Settings, *, single_record_batches: bool = False) -> None:
        config: dict[str, str | int | bool] = dict(producer_config(settings))
        if single_record_batches:
            # One record per batch. Needed for table changelogs on Tansu, whose high
            # watermark is the last batch's BASE offset + 1: Faust's recovery stops at that
            # watermark, so the rest of a multi-record last batch would never be restored
            # (payments come back with stale state). Standard Kafka; cheap there too.
            config["batch.num.messages"] = 1
        self._producer = Producer(config)
        self._errors: list[str] = []

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None:
        if is_dlq_topic(topic):
            # One place for every dead letter (intake, executor, resolver, notifications,
            # sinks, merchant webhooks): no card number in its key, value or headers.
            key, value, headers = scrub_record(key, value, headers)
        kwargs: dict[str, Any] = {"key": key, "value": value, "on_delivery": self._on_delivery}
        if headers:
            kwargs["headers"] = headers
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain

    async def flush(self, wait_seconds: float = 60.0) -> None:
        """Wait until every record published so far is acknowledged by the broker."""
        remaining = await asyncio.to_thread(self._producer.flush, wait_seconds)
        errors, self._errors = self._errors, []
        if errors:
            raise RecordsLost(f"{len(errors)} records refused by the broker: {errors[:3]}")
        if remaining:
            raise DeliveryFailed(f"{remaining} records not acknowledged yet")
