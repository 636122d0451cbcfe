"""The webhook outbox: deliveries enqueued with the ledger posting, and their history.

:func:`enqueue_deliveries` runs inside the ledger sink's PostgreSQL transaction for every
batch of events, so an event is either posted *and* has its deliveries, or neither. It is
one set-based statement: one ``webhook_deliveries`` row per (event, enabled endpoint of the
event's merchant subscribed to the event's type), due now, ``ON CONFLICT DO NOTHING`` on
``(event_id, endpoint_id)``. A redelivered batch or a replayed event (same ``event_id``)
therefore adds nothing. The payload is the event's JSON (``model_dump_json``), stored as the
exact bytes every attempt sends.

:func:`list_deliveries` and :func:`list_attempts` are the read side for operators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.events import PaymentEvent

__all__ = [
    "DELIVERY_COLUMNS",
    "AttemptRecord",
    "DeliveryRecord",
    "DeliveryStatus",
    "delivery_from_row",
    "enqueue_deliveries",
    "list_attempts",
    "list_deliveries",
]

DeliveryStatus = Literal["pending", "delivered", "dead"]

_ENQUEUE = """
INSERT INTO webhook_deliveries
       (event_id, endpoint_id, payment_id, merchant_id, event_type, payload, status,
        next_attempt_at)
SELECT ev.event_id, ep.id, ev.payment_id, ev.merchant_id, ev.event_type, ev.payload,
       'pending', now()
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[])
       AS ev(event_id, payment_id, merchant_id, event_type, payload)
  JOIN merchant_endpoints ep
    ON ep.merchant_id = ev.merchant_id
   AND ep.enabled
   AND (cardinality(ep.event_types) = 0 OR ev.event_type = ANY (ep.event_types))
 ORDER BY ev.event_id, ep.id  -- one lock order for concurrent (rebalancing) batches
ON CONFLICT (event_id, endpoint_id) DO NOTHING
"""


def _unique_events(events: Sequence[PaymentEvent]) -> list[PaymentEvent]:
    """One event per event id: the first original, else the first (replayed) copy."""
    chosen: dict[str, PaymentEvent] = {}
    for event in events:
        current = chosen.get(event.event_id)
        if current is None or (current.replayed and not event.replayed):
            chosen[event.event_id] = event
    return list(chosen.values())


async def enqueue_deliveries(conn: asyncpg.Connection, events: Sequence[PaymentEvent]) -> int:
    """Enqueue the webhook deliveries of ``events``; return how many rows were new.

    One statement whatever the batch size (call it inside the ledger's transaction).
    """
    unique = _unique_events(events)
    if not unique:
        return 0
    status: str = await conn.execute(
        _ENQUEUE,
        [e.event_id for e in unique],
        [e.payment_id for e in unique],
        [e.merchant_id for e in unique],
        [e.type for e in unique],
        [e.model_dump_json().encode() for e in unique],
    )
    # "INSERT 0 <rows>"
    return int(status.rsplit(" ", 1)[-1])


class DeliveryRecord(BaseModel):
    """One ``webhook_deliveries`` row with its endpoint's URL (payload left out)."""

    model_config = ConfigDict(frozen=True)

    id: int
    event_id: str
    endpoint_id: int
    endpoint_url: str
    endpoint_enabled: bool
    payment_id: str
    merchant_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: AwareDatetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: AwareDatetime
    delivered_at: AwareDatetime | None


class AttemptRecord(BaseModel):
    """One ``webhook_attempts`` row."""

    model_config = ConfigDict(frozen=True)

    delivery_id: int
    attempt: int
    attempted_at: AwareDatetime
    status_code: int | None
    latency_ms: float
    error: str | None


DELIVERY_COLUMNS = """d.id, d.event_id, d.endpoint_id, e.url AS endpoint_url,
       e.enabled AS endpoint_enabled, d.payment_id, d.merchant_id, d.event_type, d.status,
       d.attempts, d.next_attempt_at, d.last_status_code, d.last_error, d.created_at,
       d.delivered_at"""


def delivery_from_row(row: Any) -> DeliveryRecord:
    """A :class:`DeliveryRecord` from a row selected with :data:`DELIVERY_COLUMNS`."""
    return DeliveryRecord.model_validate(dict(row))


async def list_deliveries(
    conn: asyncpg.Connection,
    *,
    payment_id: str | None = None,
    event_id: str | None = None,
    status: DeliveryStatus | None = None,
    merchant_id: str | None = None,
    endpoint_id: int | None = None,
    limit: int = 100,
) -> list[DeliveryRecord]:
    """Deliveries matching every given filter, newest first, at most ``limit``."""
    rows = await conn.fetch(
        f"""
        SELECT {DELIVERY_COLUMNS}
          FROM webhook_deliveries d JOIN merchant_endpoints e ON e.id = d.endpoint_id
         WHERE ($1::text IS NULL OR d.payment_id = $1)
           AND ($2::text IS NULL OR d.event_id = $2)
           AND ($3::text IS NULL OR d.status = $3)
           AND ($4::text IS NULL OR d.merchant_id = $4)
           AND ($5::bigint IS NULL OR d.endpoint_id = $5)
         ORDER BY d.id DESC
         LIMIT $6
        """,  # noqa: S608 (constant column list)
        payment_id,
        event_id,
        status,
        merchant_id,
        endpoint_id,
        limit,
    )
    return [delivery_from_row(row) for row in rows]


async def list_attempts(
    conn: asyncpg.Connection, delivery_ids: Sequence[int]
) -> dict[int, list[AttemptRecord]]:
    """The attempt log of each delivery, in attempt order."""
    rows = await conn.fetch(
        """
        SELECT delivery_id, attempt, attempted_at, status_code, latency_ms, error
          FROM webhook_attempts
         WHERE delivery_id = ANY ($1::bigint[])
         ORDER BY delivery_id, attempt, id
        """,
        list(delivery_ids),
    )
    found: dict[int, list[AttemptRecord]] = {int(i): [] for i in delivery_ids}
    for row in rows:
        found[row["delivery_id"]].append(AttemptRecord.model_validate(dict(row)))
    return found
