"""The payment-status read model: the latest event of each payment, served over HTTP.

``apply_events`` upserts a batch in one statement per table. A payment's row moves only
to a higher ``sequence``, so duplicates, replays and redeliveries never regress it.

Replayed events (answers to repeated commands) are applied like any other: a replay is a
copy of the original event (same ``event_id``, same ``sequence``), so it changes nothing
when the original arrived, and repairs the row when the original was lost (a worker that
stored its state but crashed before its events reached the broker answers the
redelivered command with replays).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from schemas.events import PaymentEvent

PENDING = "payment.pending_verification"


def _supersedes(new: PaymentEvent, current: PaymentEvent) -> bool:
    """Whether ``new`` moves a payment's row that shows ``current``.

    A higher sequence wins. At an equal sequence, a resolved outcome replaces a
    ``payment.pending_verification`` event (never the reverse): a command re-executed after
    a crash that lost its state gets its first event again, now with the PSP's real
    answer. (By event type, not status: a refund being verified keeps the payment's status.)
    """
    if new.sequence != current.sequence:
        return new.sequence > current.sequence
    return current.type == PENDING and new.type != PENDING


def _latest_per_payment(events: Sequence[PaymentEvent]) -> list[PaymentEvent]:
    latest: dict[str, PaymentEvent] = {}
    for event in events:
        current = latest.get(event.payment_id)
        if current is None or _supersedes(event, current) or event == current:
            latest[event.payment_id] = event
    return list(latest.values())


async def apply_events(conn: Any, events: Sequence[PaymentEvent]) -> None:
    """Record ``events`` in the event log and move each payment's row forward."""
    if not events:
        return
    unique: dict[str, PaymentEvent] = {}
    for event in events:  # the first copy of an event id wins (originals come first)
        unique.setdefault(event.event_id, event)
    if unique:
        await conn.execute(
            """
            INSERT INTO payment_events (event_id, payment_id, type, sequence, replayed, event)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[],
                                 $5::bool[], $6::jsonb[])
            ON CONFLICT (event_id) DO NOTHING
            """,
            list(unique),
            [e.payment_id for e in unique.values()],
            [e.type for e in unique.values()],
            [e.sequence for e in unique.values()],
            [e.replayed for e in unique.values()],
            [e.model_dump_json() for e in unique.values()],
        )
    latest = _latest_per_payment(events)
    if not latest:
        return
    await conn.execute(
        """
        INSERT INTO payment_status (payment_id, merchant_id, status, sequence, event)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::jsonb[])
        ON CONFLICT (payment_id) DO UPDATE
           SET merchant_id = EXCLUDED.merchant_id,
               status = EXCLUDED.status,
               sequence = EXCLUDED.sequence,
               event = EXCLUDED.event,
               updated_at = now()
         WHERE payment_status.sequence < EXCLUDED.sequence
            OR (payment_status.sequence = 0 AND EXCLUDED.sequence = 0)
            OR (payment_status.sequence = EXCLUDED.sequence
                AND payment_status.event->>'type' = 'payment.pending_verification'
                AND EXCLUDED.event->>'type' <> 'payment.pending_verification')
        """,
        [e.payment_id for e in latest],
        [e.merchant_id for e in latest],
        [e.status for e in latest],
        [e.sequence for e in latest],
        [e.model_dump_json() for e in latest],
    )


async def get_status(conn: Any, payment_id: str) -> dict[str, Any] | None:
    """The payment's latest event as the wire contract's JSON object, or None."""
    row = await conn.fetchrow("SELECT event FROM payment_status WHERE payment_id = $1", payment_id)
    if row is None:
        return None
    value = row["event"]
    result: dict[str, Any] = json.loads(value) if isinstance(value, str) else dict(value)
    return result


async def status_counts(conn: Any) -> dict[str, int]:
    """How many payments are in each status."""
    rows = await conn.fetch("SELECT status, count(*) AS n FROM payment_status GROUP BY status")
    return {row["status"]: int(row["n"]) for row in rows}


async def stuck_payments(
    conn: Any, older_than_seconds: float, limit: int = 1_000
) -> list[dict[str, Any]]:
    """Payments still pending verification (PSP outcome unknown) for longer than the age,
    oldest first, as ``payment_id, merchant_id, status, updated_at, event``."""
    rows = await conn.fetch(
        """
        SELECT payment_id, merchant_id, status, updated_at, event FROM payment_status
         WHERE status = 'pending_verification'
           AND updated_at < now() - make_interval(secs => $1::double precision)
         ORDER BY updated_at
         LIMIT $2
        """,
        float(older_than_seconds),
        limit,
    )
    out: list[dict[str, Any]] = []
    for row in rows:
        value = row["event"]
        event = json.loads(value) if isinstance(value, str) else dict(value)
        out.append({
            "payment_id": row["payment_id"], "merchant_id": row["merchant_id"],
            "status": row["status"], "updated_at": row["updated_at"].isoformat(),
            "amount": event.get("amount"), "currency": event.get("currency"),
            "psp": event.get("psp"), "reason": event.get("reason"),
        })
    return out


async def without_superseded_pending(
    conn: Any, events: Sequence[PaymentEvent]
) -> list[PaymentEvent]:
    """``events`` less the ``payment.pending_verification`` events their command already
    has an outcome for (an event of the same payment and idempotency key, not pending,
    at the same or a later sequence).

    That happens when a worker dies after publishing a command's outcome but before
    saving the payment's state: the redelivered command runs again, the PSP's replay is
    lost or times out, and a "pending" event follows the outcome already sent. Its
    resolution gets the outcome's own event id, so the event log and the webhook outbox
    would keep the stray "pending" as the command's last word. The status row is
    protected by its sequence rule; this keeps the log and the merchant's webhooks right.
    """
    pending = [e for e in events if e.type == "payment.pending_verification"]
    if not pending:
        return list(events)
    rows = await conn.fetch(
        """
        SELECT payment_id, event->>'idempotency_key' AS idempotency_key,
               max(sequence) AS sequence
          FROM payment_events
         WHERE payment_id = ANY($1::text[])
           AND type NOT IN ('payment.pending_verification', 'payment.rejected')
         GROUP BY 1, 2
        """,
        sorted({e.payment_id for e in pending}),
    )
    settled = {(r["payment_id"], r["idempotency_key"]): int(r["sequence"]) for r in rows}
    for event in events:  # outcomes earlier in this very batch count too
        if event.type not in ("payment.pending_verification", "payment.rejected"):
            key = (event.payment_id, event.idempotency_key)
            settled[key] = max(settled.get(key, -1), event.sequence)
    return [
        e for e in events
        if e.type != "payment.pending_verification"
        or settled.get((e.payment_id, e.idempotency_key), -1) < e.sequence
    ]
