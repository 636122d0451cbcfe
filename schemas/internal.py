"""Internal messages between paystream's own agents (never produced by checkout systems).

* :class:`VerifyRequest` (on ``payments.verify.<tier>``): an attempt whose PSP outcome is
  unknown, to be looked up at the PSP after the tier's delay.
* :class:`ResolvePayment` (on ``payments.internal``): what the PSP says about that
  attempt, applied to the payment by the command processor (the payment's only writer).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

PendingOperation = Literal["authorize", "capture"]


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
    lookups: int = 0
    """Lookups already made."""
    due_at: AwareDatetime


class ResolvePayment(BaseModel):
    """The PSP's answer about an attempt whose outcome was unknown."""

    model_config = ConfigDict(frozen=True)

    type: Literal["resolve_payment"] = "resolve_payment"
    payment_id: str
    attempt_id: str
    operation: PendingOperation
    psp: str
    found: bool
    """False: the PSP has no record of the attempt after every lookup (nothing charged)."""
    status: str | None = None
    psp_reference: str | None = None
    amount_captured: int = 0
    decline_code: str | None = None
    message: str | None = None
