"""The payment_status read model: which event a payment's row shows (real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from schemas.events import PaymentEvent
from sinks import status
from sinks.migrations import migrate
from tests.agents.test_pipeline import unique


def _event(payment: str, event_type: str, event_status: str, sequence: int,
           refunded: int) -> PaymentEvent:
    return PaymentEvent.model_validate({
        "type": event_type, "event_id": unique("evt"), "payment_id": payment,
        "merchant_id": "m_rm", "command_id": unique("cmd"), "idempotency_key": "r1",
        "status": event_status, "amount": 1_000, "currency": "USD",
        "amount_captured": 1_000, "amount_refunded": refunded,
        "occurred_at": datetime.now(UTC), "sequence": sequence, "refund_id": "re_1",
    })


async def test_a_refund_outcome_replaces_its_pending_event_at_the_same_sequence(
    pg_dsn: str,
) -> None:
    """A refund being verified keeps the payment ``captured``; when a re-run after a crash
    gets the outcome at the same sequence, the outcome must win (by event type, since the
    status of both is not ``pending_verification``). Found by the fault simulation."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        payment = unique("pay")
        pending = _event(payment, "payment.pending_verification", "captured", 2, 0)
        refunded = _event(payment, "payment.refunded", "refunded", 2, 1_000)
        await status.apply_events(conn, [pending])
        await status.apply_events(conn, [refunded])
        row = await status.get_status(conn, payment)
        assert row is not None and row["type"] == "payment.refunded", row
        await status.apply_events(conn, [pending])  # never the reverse
        row = await status.get_status(conn, payment)
        assert row is not None and row["type"] == "payment.refunded", row
    finally:
        await conn.close()
