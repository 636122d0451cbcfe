"""Dead letters of the agents: a record that cannot be processed goes to its DLQ, with why.

Every agent parks an unusable record rather than crash-looping on it or acking it
silently; the envelope headers (``schemas.dlq.DlqEnvelope``) say where it came from and
why, and the payload loses card numbers on the way (``scrub_payload``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from observability import metrics
from schemas.dlq import DlqEnvelope, scrub_payload
from topics import catalog as cat
from topics.publisher import EventPublisher

log = logging.getLogger("paystream.agents")


def dead_letter_headers(
    event: Any, stage: str, reason: str, error_type: str, message: str, group: str
) -> list[tuple[str, bytes]]:
    now = datetime.now(UTC)
    msg = event.message
    timestamp = (
        datetime.fromtimestamp(msg.timestamp, UTC) if getattr(msg, "timestamp", None) else None
    )
    envelope = DlqEnvelope(
        stage=stage,
        reason=reason,
        error_type=error_type,
        error_message=message,
        original_topic=msg.topic,
        original_partition=msg.partition,
        original_offset=msg.offset,
        original_timestamp=timestamp,
        consumer_group=group,
        first_failure_at=now,
        last_failure_at=now,
    )
    return envelope.to_headers()



def dead_letter(
    publisher: EventPublisher, event: Any, stage: str, reason: str, error_type: str,
    message: str, group: str,
) -> None:
    metrics.DLQ_RECORDS.labels(stage, reason).inc()
    dlq = cat.COMMANDS_DLQ if event.message.topic == cat.COMMANDS else cat.EVENTS_DLQ
    publisher.publish(
        dlq,
        event.key,
        scrub_payload(event.value) if event.value is not None else None,
        dead_letter_headers(event, stage, reason, error_type, message[:1000], group),
    )


def dead_letter_unexpected(
    publisher: EventPublisher, event: Any, stage: str, exc: Exception, group: str
) -> None:
    log.exception("unexpected error in %s at %s[%s]@%s", stage, event.message.topic,
                  event.message.partition, event.message.offset)
    dead_letter(publisher, event, stage, "unexpected_error", type(exc).__name__, str(exc),
                group)
