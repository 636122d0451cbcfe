"""Building payment events from a payment's state and the command that caused them."""

from __future__ import annotations

from datetime import UTC, datetime

from agents.state import PaymentState
from schemas.commands import CommandEnvelope
from schemas.events import EventType, PaymentEvent, PaymentStatus, derive_event_id


def build_event(
    state: PaymentState | None,
    envelope: CommandEnvelope,
    event_type: EventType,
    status: PaymentStatus,
    **extra: object,
) -> PaymentEvent:
    """An event carrying the payment's figures after the command (zeros when unknown)."""
    fields: dict[str, object] = {
        "type": event_type,
        "event_id": derive_event_id(
            envelope.merchant_id, envelope.payment_id, envelope.idempotency_key, event_type
        ),
        "payment_id": envelope.payment_id,
        "merchant_id": envelope.merchant_id,
        "command_id": envelope.command_id,
        "idempotency_key": envelope.idempotency_key,
        "status": status,
        "amount": state.amount if state else int(getattr(envelope, "amount", 0) or 0),
        "currency": state.currency if state else _currency_of(envelope),
        "amount_captured": state.amount_captured if state else 0,
        "amount_refunded": state.amount_refunded if state else 0,
        "occurred_at": datetime.now(UTC),
        "psp": state.psp if state else None,
        "psp_reference": state.psp_reference if state else None,
        "sequence": state.sequence if state else 0,
        "command_created_at": envelope.created_at,
        "capture_method": state.capture_method if state else None,
    }
    fields.update(extra)
    return PaymentEvent.model_validate(fields)


def _currency_of(envelope: CommandEnvelope) -> str | None:
    currency = getattr(envelope, "currency", None)
    return currency if isinstance(currency, str) else None


def rejection(state: PaymentState | None, envelope: CommandEnvelope, reason: str) -> PaymentEvent:
    """A ``payment.rejected`` event; it never changes the payment's stored state.

    Its status is the payment's current status, or ``rejected`` when the payment does not
    exist (so the read model never shows a rejected command as a payment's new status).
    """
    if state is None or state.status == "created":
        status: PaymentStatus = "rejected"
    else:
        status = state.status
    return build_event(state, envelope, "payment.rejected", status, reason=reason)
