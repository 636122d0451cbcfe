"""The PSP adapter contract: request/result models and the ``PspAdapter`` protocol.

Every payment service provider (PSP) we talk to is wrapped in an adapter that speaks
these models, so the executor, the resolver and the router never see a PSP's wire format.

Outcome semantics of :class:`PspResult` (the executor's decisions hang on them):

``succeeded``
    The PSP did what was asked (authorized, captured, voided, refunded). ``status`` is the
    PSP's own state after the call (``requires_capture``, ``succeeded``, ``canceled``, ...).
``requires_action``
    The customer must act (3-D Secure); nothing is authorized yet.
``declined``
    A final answer: the PSP refused (card decline, or a request it rejected such as a
    capture in the wrong state). ``decline_code`` says why. Nothing happened.
``retryable_error``
    The PSP answered with 5xx / 429, or with a retryable decline such as
    ``processing_error``. For 5xx / 429 the same attempt id (idempotency key) may be sent
    again; the PSP replays a stored decline for a key it has already answered, so a
    retryable *decline* is retried under a new attempt id. ``retry_after`` (seconds) is
    set when the PSP asked for a pause.
``not_sent``
    The request certainly had no effect at the PSP (connection refused, DNS failure,
    no free connection within the timeout, credentials rejected). Failover is allowed.
``unknown``
    The request may have reached the PSP (timeout after sending, connection reset or
    dropped, unreadable response, key still in flight). NEVER a failure: the payment
    waits until :meth:`PspAdapter.retrieve`, a webhook or a settlement file resolves it.

Amounts are ``int`` minor units everywhere; floats are refused by validation.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from psp.settlement import SettlementRow

MAX_AMOUNT_MINOR = 10**12 - 1
"""Largest amount in minor units a request may carry (same bound as ``schemas.money``)."""

PositiveMinorUnits = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MINOR)]
MinorUnits = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]
Identifier = Annotated[str, Field(min_length=1, max_length=255)]
CurrencyCode = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]

Outcome = Literal[
    "succeeded", "requires_action", "declined", "retryable_error", "not_sent", "unknown"
]
CaptureMethod = Literal["automatic", "manual"]

STATUS_NOT_FOUND = "not_found"
"""``PspResult.status`` of a :meth:`PspAdapter.retrieve` that found nothing (outcome ``unknown``:
the original request may still be in flight, so absence alone is not proof of no charge)."""


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    attempt_id: Identifier
    """Our attempt id; sent to the PSP as its idempotency key."""
    payment_id: Identifier


class AuthorizeRequest(_Request):
    """Authorize (``capture_method="manual"``) or charge (``"automatic"``) a payment method."""

    merchant_id: Identifier
    amount: PositiveMinorUnits
    currency: CurrencyCode
    """ISO 4217, upper case (``USD``); adapters convert to their PSP's spelling."""
    payment_method: Identifier
    """A PSP payment-method token such as ``tok_visa``; never a card number."""
    capture_method: CaptureMethod


class CaptureRequest(_Request):
    """Capture an authorization; ``amount`` may be less than authorized (partial capture)."""

    psp_reference: Identifier
    amount: PositiveMinorUnits


class VoidRequest(_Request):
    """Release an uncaptured authorization."""

    psp_reference: Identifier


class RefundRequest(_Request):
    """Refund part or all of a captured payment."""

    psp_reference: Identifier
    amount: PositiveMinorUnits


class PayoutRequest(BaseModel):
    """Pay a merchant's funds out to a bank account token (``btok_...``)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    attempt_id: Identifier
    payout_id: Identifier
    merchant_id: Identifier
    amount: PositiveMinorUnits
    currency: CurrencyCode
    destination: Identifier


class PspNotification(BaseModel):
    """A verified PSP webhook, normalised: what happened to which payment at the PSP."""

    model_config = ConfigDict(frozen=True)

    psp: str
    event_id: str
    """The PSP's event id (deduplication key)."""
    type: str
    """The PSP's event type, e.g. ``payment_intent.succeeded``."""
    psp_reference: str | None = None
    payment_id: str | None = None
    """Our payment id, when the PSP echoes it (metadata)."""
    attempt_id: str | None = None
    """Our attempt id (the idempotency key of the call that created the object), when the
    PSP echoes it (metadata): a webhook settles only the attempt it is about."""
    object_id: str | None = None
    """The PSP's id of the object the event is about (a refund id for refund events)."""
    status: str | None = None
    amount: MinorUnits = 0
    currency: str | None = None
    created: int = 0
    """The PSP's event time, Unix seconds."""


class PspResult(BaseModel):
    """What one PSP call produced; see the module docstring for ``outcome``."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    outcome: Outcome
    psp: str
    psp_reference: str | None = None
    """The PSP's id of the payment (a PaymentIntent id for Stripe-like PSPs)."""
    status: str | None = None
    """The PSP's status of the payment (or of the refund, for refunds)."""
    amount_authorized: MinorUnits = 0
    amount_captured: MinorUnits = 0
    amount_refunded: MinorUnits = 0
    """For a refund call: the amount of this refund. For retrieve: total refunded so far."""
    refund_reference: str | None = None
    """For a refund call: the PSP's id of the refund."""
    decline_code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    """Seconds the PSP asked us to wait before retrying (``Retry-After``); not money."""


@runtime_checkable
class PspAdapter(Protocol):
    """One PSP behind a uniform async API. Implementations never raise for PSP or network
    failures: every such failure is expressed as a :class:`PspResult` outcome."""

    @property
    def name(self) -> str:
        """The PSP's name as used in routing and events (``PspResult.psp``)."""
        ...

    async def authorize(self, req: AuthorizeRequest) -> PspResult: ...

    async def capture(self, req: CaptureRequest) -> PspResult: ...

    async def void(self, req: VoidRequest) -> PspResult: ...

    async def refund(self, req: RefundRequest) -> PspResult: ...

    async def retrieve(
        self, *, psp_reference: str | None = None, attempt_id: str | None = None
    ) -> PspResult:
        """Current state of a payment, by the PSP's reference or by the ``attempt_id`` of the
        authorize call that created it (for when that call's response was lost). Exactly
        one of the two must be given. Nothing found: outcome ``unknown``, status
        :data:`STATUS_NOT_FOUND`."""
        ...

    async def payout(self, req: PayoutRequest) -> PspResult:
        """Send funds to a bank token; ``psp_reference`` is the PSP's payout id."""
        ...

    def parse_webhook(self, payload: bytes, signature_header: str) -> PspNotification:
        """Verify a webhook's signature over the raw body (raises ``SignatureError``) and
        normalise it."""
        ...

    async def settlement_report(self, day: date | None = None) -> list[SettlementRow]:
        """The PSP's settlement rows for one UTC day (all days when None)."""
        ...

    async def close(self) -> None:
        """Release network resources (an owned HTTP session)."""
        ...
