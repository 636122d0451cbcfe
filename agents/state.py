"""Per-payment state kept in the ``payment_state`` Faust table, and its transitions.

Pure logic: no I/O. The state machine is the one place that decides which command is
allowed in which status; terminal states never move.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import PaymentStatus

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
    """A PSP call whose outcome is unknown, and the command that made it."""

    model_config = ConfigDict(frozen=True)

    operation: Literal["authorize", "capture"]
    attempt_id: str
    amount: int
    """Amount of the call (authorized or to capture)."""
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
    commands: dict[str, IdempotencyRecord] = Field(
        default_factory=dict, description="idempotency_key -> record (merchant-scoped)."
    )

    @property
    def capturable(self) -> int:
        return self.amount - self.amount_captured if self.status == "authorized" else 0


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
