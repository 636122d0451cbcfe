"""Read a topic from the beginning with confluent-kafka (no consumer group), for tests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, TopicPartition


class TopicReader:
    """Collects every record of a topic; ``until`` polls until a condition holds."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "unused-test-reader",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self.records: list[Any] = []

    def poll(self) -> None:
        for message in self._consumer.consume(1000, timeout=0.2):
            if message.error() is None:
                self.records.append(message)

    def values(self) -> list[dict[str, Any]]:
        return [json.loads(m.value()) for m in self.records]

    def until(self, check: Callable[[list[Any]], Any], timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            result = check(self.records)
            if result:
                return result
        raise AssertionError(f"{self.topic}: condition not met in {timeout}s "
                             f"({len(self.records)} records seen)")

    def close(self) -> None:
        self._consumer.close()
