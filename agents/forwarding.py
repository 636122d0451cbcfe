"""Commands that arrived on the wrong partition go to the payment's one writer.

Every payment's records (commands, PSP lookups' answers, retries, webhooks, its state
changelog) must share one partition, the one Kafka's Java default partitioner (murmur2)
gives its ``payment_id``; paystream's own producers use librdkafka's ``murmur2_random``,
which places keys the same way. A checkout whose producer used another partitioner
(librdkafka's default ``consistent_random`` is CRC32) puts a command somewhere else, where
the answers about that payment would never arrive. Intake therefore does not process such a
command: it forwards the record's key, value and headers unchanged to the right partition
of ``payments.commands`` (one extra hop), with headers saying where it came from. The
forward is published by the batch's publisher and flushed before the batch is acknowledged,
like any other output, so a crash can only forward it twice (an idempotent replay).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from observability import metrics
from topics.partitioning import java_partition

FORWARDED_FROM_HEADER = "paystream.forwarded_from"
"""``<topic>:<partition>:<offset>`` of the misplaced record a forwarded command copies."""
FORWARDED_HEADER = "paystream.forwarded"
"""``1`` on a forwarded command."""


class Publisher(Protocol):
    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
        partition: int | None = None,
    ) -> None: ...


def home_partition(key: bytes | None, partitions: int) -> int | None:
    """The partition that owns ``key`` (``None`` for a record without a key)."""
    if key is None:
        return None
    return java_partition(key, partitions)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    if raw is None:
        return []
    items = raw.items() if isinstance(raw, Mapping) else raw
    out: list[tuple[str, bytes]] = []
    for name, value in items:
        if name in (FORWARDED_HEADER, FORWARDED_FROM_HEADER):
            continue  # a record forwarded twice says where it was last
        out.append((str(name), value if isinstance(value, bytes) else str(value).encode()))
    return out


def forward_if_misplaced(publisher: Publisher, event: Any, partitions: int) -> bool:
    """Forward ``event`` (a ``payments.commands`` record) if it is on the wrong partition.

    Returns True when the record was forwarded: the caller must not process it. Records
    without a key stay where they are (intake dead-letters them).
    """
    message = event.message
    target = home_partition(message.key, partitions)
    if target is None or target == message.partition:
        return False
    headers = _headers(getattr(message, "headers", None))
    headers.append((FORWARDED_HEADER, b"1"))
    headers.append(
        (FORWARDED_FROM_HEADER,
         f"{message.topic}:{message.partition}:{message.offset}".encode())
    )
    publisher.publish(message.topic, message.key, message.value, headers, partition=target)
    metrics.COMMANDS_FORWARDED.inc()
    return True
