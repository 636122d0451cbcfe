"""Payment events: authoritative outcomes published to ``payments.events``.

Every event carries the same fields (the payment's state after the event), so a consumer
can keep a read model from the latest event alone. ``event_id`` is derived from the
command that caused the event, so re-processing a command after a crash produces the same
event id and every sink can deduplicate on it.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from schemas.money import Currency

EventType = Literal[
    "payment.authorized",
    "payment.captured",
    "payment.declined",
    "payment.failed",
    "payment.canceled",
    "payment.refunded",
    "payment.refund_failed",
    "payment.requires_action",
    "payment.pending_verification",
    "payment.rejected",
    "payout.paid",
    "payout.failed",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

PaymentStatus = Literal[
    "requires_action",
    "authorized",
    "captured",
    "partially_refunded",
    "refunded",
    "declined",
    "failed",
    "canceled",
    "pending_verification",
    "rejected",
]
STATUSES: tuple[str, ...] = PaymentStatus.__args__  # type: ignore[attr-defined]

_EVENT_NAMESPACE = uuid.UUID("5f0c6b1e-8f8a-4a52-9a56-3c3c8f1e2a10")


def derive_event_id(
    merchant_id: str, payment_id: str, idempotency_key: str, event_type: str, seq: int = 0
) -> str:
    """A stable event id for the ``seq``-th event of ``event_type`` caused by one command.

    The payment is part of the name: a merchant may reuse an idempotency key for another
    payment once the key's retention is over, and that payment's events must not share
    ids with the first one's (the ledger, the event log and the webhook outbox skip an id
    they have seen).
    """
    name = f"{merchant_id}\x1f{payment_id}\x1f{idempotency_key}\x1f{event_type}\x1f{seq}"
    return f"evt_{uuid.uuid5(_EVENT_NAMESPACE, name).hex}"


class PaymentEvent(BaseModel):
    """One outcome of one payment (the wire contract's event object)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: EventType
    schema_version: Literal[1] = 1
    event_id: str
    payment_id: str
    merchant_id: str
    command_id: str
    idempotency_key: str
    status: PaymentStatus
    amount: Annotated[StrictInt, Field(ge=0)]
    currency: Currency | None
    amount_captured: Annotated[StrictInt, Field(ge=0)] = 0
    amount_refunded: Annotated[StrictInt, Field(ge=0)] = 0
    occurred_at: AwareDatetime
    replayed: bool = False
    psp: str | None = None
    psp_reference: str | None = None
    decline_code: str | None = None
    reason: str | None = None
    refund_id: str | None = None
    payout_id: str | None = None
    # Not in the v1 contract's required list; added fields (allowed by the contract):
    sequence: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Per-payment event counter; the read model keeps the highest."
    )
    amount_captured_now: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Amount captured by this event (payment.captured), minor units."
    )
    amount_refunded_now: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Amount refunded by this event (payment.refunded), minor units."
    )
    fee_refunded_now: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Processing fee returned with this refund (proportional), minor units."
    )
    fee: Annotated[StrictInt, Field(ge=0)] = Field(
        0, description="Processing fee of amount_captured_now, minor units."
    )
    capture_method: Literal["automatic", "manual"] | None = Field(
        None, description="The payment's capture method (manual captures draw on a hold)."
    )
    command_created_at: AwareDatetime | None = Field(
        None, description="created_at of the command that caused this event (latency)."
    )


# Named aliases for the event kinds the walking skeleton emits (same shape, fixed type).
class PaymentAuthorized(PaymentEvent):
    type: Literal["payment.authorized"] = "payment.authorized"


class PaymentCaptured(PaymentEvent):
    type: Literal["payment.captured"] = "payment.captured"


class PaymentDeclined(PaymentEvent):
    type: Literal["payment.declined"] = "payment.declined"


class PaymentFailed(PaymentEvent):
    type: Literal["payment.failed"] = "payment.failed"


class PaymentRejected(PaymentEvent):
    type: Literal["payment.rejected"] = "payment.rejected"
