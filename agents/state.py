"""Per-payment state kept in the ``payment_state`` Faust table, and its transitions.

Pure logic: no I/O. The state machine is the one place that decides which command is
allowed in which status; terminal states never move.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import PaymentStatus
from schemas.internal import PendingOperation

Status = PaymentStatus | Literal["created"]

TERMINAL: frozenset[str] = frozenset(
    {"refunded", "declined", "failed", "canceled", "rejected"}
)


class IdempotencyRecord(BaseModel):
    """What a command with a given idempotency key asked for, and what it produced."""

    model_config = ConfigDict(frozen=True)

    fingerprint: str
    events: list[str] = Field(default_factory=list, description="JSON of emitted events.")


class PendingAttempt(BaseModel):
    """A PSP call whose outcome is unknown, and the command that made it.

    Only the PSP's positive statement settles it: the resolver re-sends ``request`` (same
    attempt id, so the PSP's idempotency replays the first answer or, if the first never
    arrived, processes it once) until the PSP answers with an outcome. A lookup that fails
    is never taken as an answer.
    """

    model_config = ConfigDict(frozen=True)

    operation: PendingOperation
    attempt_id: str
    amount: int
    """Amount of the call (authorized, to capture or to refund)."""
    command_id: str
    idempotency_key: str
    command_created_at: AwareDatetime
    request: str | None = None
    """JSON of the PSP request (``psp.protocol``'s model for ``operation``) to re-send."""
    refund_id: str | None = None
    prior_status: str | None = None
    """The payment's status before the call (what a refused capture/void/refund keeps)."""
    since: AwareDatetime | None = None
    """When the outcome became unknown (the stuck-payment sweep measures from here)."""

class PendingRefund(BaseModel):
    """A refund the PSP accepted as ``pending``: final only when its webhook says so."""

    model_config = ConfigDict(frozen=True)

    refund_id: str
    refund_reference: str | None
    amount: int
    command_id: str
    idempotency_key: str
    command_created_at: AwareDatetime


class PaymentState(BaseModel):
    """Everything the command processor knows about one payment."""

    payment_id: str
    merchant_id: str
    status: Status = "created"
    amount: int = 0
    currency: str | None = None
    capture_method: Literal["automatic", "manual"] = "automatic"
    amount_captured: int = 0
    amount_refunded: int = 0
    psp: str | None = None
    psp_reference: str | None = None
    sequence: int = 0
    attempts: int = 0
    pending: PendingAttempt | None = None
    authorized_at: AwareDatetime | None = None
    """When the authorization (manual capture) succeeded: the expiry clock starts here."""
    fees: int = 0
    """Processing fees charged on the captures so far (minor units)."""
    fees_refunded: int = 0
    refunds: dict[str, int] = Field(
        default_factory=dict, description="refund_id -> amount refunded (succeeded)."
    )
    pending_refunds: dict[str, PendingRefund] = Field(
        default_factory=dict, description="refund_id -> refund the PSP reported pending."
    )
    retrying: dict[str, int] = Field(
        default_factory=dict,
        description="idempotency_key -> retry attempt parked in a retry tier for it.",
    )
    applied_notifications: list[str] = Field(
        default_factory=list, description="Recent PSP event ids applied (dedupe)."
    )
    commands: dict[str, IdempotencyRecord] = Field(
        default_factory=dict, description="idempotency_key -> record (merchant-scoped)."
    )

    @property
    def capturable(self) -> int:
        return self.amount - self.amount_captured if self.status == "authorized" else 0

    @property
    def refundable(self) -> int:
        """What may still be refunded (pending refunds, and a refund being verified, count
        as spent)."""
        pending = sum(r.amount for r in self.pending_refunds.values())
        if self.pending is not None and self.pending.operation == "refund":
            pending += self.pending.amount
        return self.amount_captured - self.amount_refunded - pending


class TransitionError(ValueError):
    """The command is not allowed in the payment's current status."""


def check_capture(state: PaymentState | None, amount: int | None) -> int:
    """The amount to capture, or a TransitionError saying why a capture is refused."""
    if state is None or state.status == "created":
        raise TransitionError("cannot capture: unknown payment")
    if state.status != "authorized":
        raise TransitionError(f"cannot capture a payment in status {state.status}")
    remaining = state.amount - state.amount_captured
    wanted = remaining if amount is None else amount
    if wanted > remaining:
        raise TransitionError(
            f"cannot capture {wanted}: only {remaining} {state.currency} is authorized"
        )
    return wanted


REFUNDABLE_STATUSES = frozenset({"captured", "partially_refunded"})


def check_void(state: PaymentState | None) -> None:
    """Raise a TransitionError unless ``state`` is an uncaptured authorization."""
    if state is None or state.status == "created":
        raise TransitionError("cannot void: unknown payment")
    if state.status in {"captured", "partially_refunded", "refunded"}:
        raise TransitionError(
            f"cannot void a payment in status {state.status}: it was captured; refund it"
        )
    if state.status != "authorized":
        raise TransitionError(f"cannot void a payment in status {state.status}")


def check_refund(state: PaymentState | None, amount: int | None) -> int:
    """The amount to refund, or a TransitionError saying why a refund is refused."""
    if state is None or state.status == "created":
        raise TransitionError("cannot refund: unknown payment")
    if state.status not in REFUNDABLE_STATUSES:
        raise TransitionError(f"cannot refund a payment in status {state.status}")
    remaining = state.refundable
    wanted = remaining if amount is None else amount
    if wanted <= 0:
        raise TransitionError("cannot refund: nothing left to refund")
    if wanted > remaining:
        raise TransitionError(
            f"cannot refund {wanted}: only {remaining} {state.currency} is left to refund"
        )
    return wanted


def fee_refund_for(state: PaymentState, amount: int) -> int:
    """Our fee returned with a refund of ``amount``: proportional, the rest on the last one.

    The merchant's wallet received ``captured - fees``; refunding the whole amount without
    the fee would take it below zero, which the ledger refuses.
    """
    remaining_fees = state.fees - state.fees_refunded
    if state.amount_refunded + amount >= state.amount_captured:
        return remaining_fees
    if state.amount_captured == 0:
        return 0
    return min(remaining_fees, state.fees * amount // state.amount_captured)


def refunded_status(state: PaymentState) -> Literal["refunded", "partially_refunded"]:
    return "refunded" if state.amount_refunded >= state.amount_captured else "partially_refunded"
