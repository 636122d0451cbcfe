"""Internal messages between paystream's own agents (never produced by checkout systems).

* :class:`VerifyRequest` (on ``payments.verify.<tier>``): an attempt whose PSP outcome is
  unknown, to be looked up at the PSP after the tier's delay.
* :class:`ResolvePayment` (on ``payments.internal``): what the PSP says about that
  attempt, applied to the payment by the command processor (the payment's only writer).
* :class:`ExpireAuthorization` (on ``payments.internal``): the expiry sweep found an
  authorization older than its validity; the processor voids it (if it still is one).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

from schemas.pan import scrub_standalone_pans

ScrubbedText = Annotated[str, AfterValidator(scrub_standalone_pans)]
"""Text copied from a record into another topic: card-number-like digit runs replaced."""

PendingOperation = Literal["authorize", "capture", "void", "refund"]


class VerifyRequest(BaseModel):
    """Look up ``attempt_id`` at ``psp`` no earlier than ``due_at``."""

    model_config = ConfigDict(frozen=True)

    payment_id: str
    merchant_id: str
    psp: str
    operation: PendingOperation
    attempt_id: str
    psp_reference: str | None = None
    expected_captured: int = 0
    """For a capture: the total captured at the PSP if the capture went through."""
    request: str | None = None
    """JSON of the PSP request to re-send with the same attempt id (the preferred lookup:
    the PSP's idempotency returns the real outcome even while the first call is in flight)."""
    lookups: int = 0
    """Lookups already made."""
    sweep: bool = False
    """Sent by the stuck-payment sweep: one lookup; if it fails, the next sweep asks again
    (no further tiers, no dead letter)."""
    due_at: AwareDatetime


class ResolvePayment(BaseModel):
    """The PSP's answer about an attempt whose outcome was unknown.

    ``result`` is the JSON of the ``psp.protocol.PspResult`` the PSP gave to the re-sent
    request (or a lookup). The resolver only sends a positive statement of an outcome: a
    lookup that failed (5xx, 429, connection refused, still in flight) is never an answer.
    """

    model_config = ConfigDict(frozen=True)

    type: Literal["resolve_payment"] = "resolve_payment"
    payment_id: str
    attempt_id: str
    operation: PendingOperation
    psp: str
    result: str
    source: Literal["resend", "lookup", "webhook", "operator"] = "resend"
    redeliveries: int = 0
    """Times it came back from a retry tier because the payment's state was not there."""


class ExpireAuthorization(BaseModel):
    """Void ``payment_id``'s authorization if it is still uncaptured past its validity."""

    model_config = ConfigDict(frozen=True)

    type: Literal["expire_authorization"] = "expire_authorization"
    payment_id: str
    requested_at: AwareDatetime


class RetryCommand(BaseModel):
    """A command that hit a transient PSP failure, back from its retry tier."""

    model_config = ConfigDict(frozen=True)

    type: Literal["retry_command"] = "retry_command"
    payment_id: str
    attempt: int
    """Retries already scheduled for this command (1 for the first retry)."""
    command: ScrubbedText
    """The original command's JSON, byte for byte (a card number never gets this far:
    intake rejects it; should one slip through, it is scrubbed here, not copied)."""
    original_topic: str
    original_partition: int
    original_offset: int
    first_failure_at: AwareDatetime


class RetryNotification(BaseModel):
    """A PSP notification for a payment not known yet, back from its retry tier."""

    model_config = ConfigDict(frozen=True)

    type: Literal["retry_notification"] = "retry_notification"
    payment_id: str
    attempt: int
    notification: ScrubbedText
    """The notification's JSON (a ``psp.protocol.PspNotification``), PAN-scrubbed."""


class Delayed(BaseModel):
    """A record parked on ``payments.retry.tierN``: publish ``value`` to ``target_topic``
    (keyed ``key``) once ``due_at`` has passed."""

    model_config = ConfigDict(frozen=True)

    due_at: AwareDatetime
    target_topic: str
    key: ScrubbedText
    value: ScrubbedText
    kind: Literal["command", "notification", "resolution"]


InternalRecord = ResolvePayment | ExpireAuthorization | RetryCommand | RetryNotification
InternalMessage = Annotated[InternalRecord, Field(discriminator="type")]
INTERNAL_ADAPTER: TypeAdapter[InternalRecord] = TypeAdapter(InternalMessage)
