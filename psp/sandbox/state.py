"""In-memory state of one sandbox PSP: payment intents, refunds, idempotency records, faults.

All mutations are synchronous (no ``await`` inside), so on a single event loop every API
operation is atomic. Business rules (magic tokens, capture / cancel / refund rules) live
here too and raise :class:`ApiError` with Stripe's error shape.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

JsonDict = dict[str, Any]


class ApiError(Exception):
    """An error answer in Stripe's shape ``{"error": {...}}``.

    ``saved`` is False for errors raised before the operation began (parameter
    validation); those are not stored under the idempotency key, as with Stripe.
    """

    def __init__(
        self,
        http_status: int,
        error_type: str,
        message: str,
        *,
        code: str | None = None,
        decline_code: str | None = None,
        param: str | None = None,
        payment_intent: JsonDict | None = None,
        saved: bool = True,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.saved = saved
        body: JsonDict = {"type": error_type, "message": message}
        if code is not None:
            body["code"] = code
        if decline_code is not None:
            body["decline_code"] = decline_code
        if param is not None:
            body["param"] = param
        if payment_intent is not None:
            body["payment_intent"] = payment_intent
        self.body: JsonDict = {"error": body}


@dataclass(frozen=True)
class TokenBehaviour:
    """What a magic payment-method token does when charged."""

    result: Literal["approve", "decline", "requires_action"]
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None
    refund_fails: bool = False
    disputed: bool = False


_DECLINED = "Your card was declined."

TOKENS: dict[str, TokenBehaviour] = {
    "tok_visa": TokenBehaviour("approve"),
    "tok_mastercard": TokenBehaviour("approve"),
    "tok_createDispute": TokenBehaviour("approve", disputed=True),
    "tok_refundFail": TokenBehaviour("approve", refund_fails=True),
    "tok_threeDSecureRequired": TokenBehaviour("requires_action"),
    "tok_chargeDeclined": TokenBehaviour("decline", "card_declined", "generic_decline", _DECLINED),
    "tok_chargeDeclinedInsufficientFunds": TokenBehaviour(
        "decline", "card_declined", "insufficient_funds", "Your card has insufficient funds."
    ),
    "tok_chargeDeclinedLostCard": TokenBehaviour(
        "decline", "card_declined", "lost_card", _DECLINED
    ),
    "tok_chargeDeclinedStolenCard": TokenBehaviour(
        "decline", "card_declined", "stolen_card", _DECLINED
    ),
    "tok_chargeDeclinedExpiredCard": TokenBehaviour(
        "decline", "expired_card", "expired_card", "Your card has expired."
    ),
    "tok_chargeDeclinedIncorrectCvc": TokenBehaviour(
        "decline", "incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."
    ),
    "tok_chargeDeclinedProcessingError": TokenBehaviour(
        "decline",
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}
"""Stripe test-token names understood by the sandbox."""


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Refund:
    id: str
    payment_intent: str
    amount: int
    currency: str
    status: str
    created: datetime
    idempotency_key: str | None
    failure_reason: str | None = None

    def to_json(self, *, status: str | None = None) -> JsonDict:
        return {
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "currency": self.currency,
            "payment_intent": self.payment_intent,
            "status": status or self.status,
            "failure_reason": None if status else self.failure_reason,
            "created": int(self.created.timestamp()),
        }


@dataclass
class PaymentIntent:
    id: str
    idempotency_key: str | None
    amount: int
    currency: str
    payment_method: str
    capture_method: str
    status: str
    metadata: dict[str, str]
    created: datetime
    amount_capturable: int = 0
    amount_received: int = 0
    last_payment_error: JsonDict | None = None
    refund_fails: bool = False
    disputed: bool = False
    cancellation_reason: str | None = None
    refunds: list[Refund] = field(default_factory=list)

    @property
    def amount_refunded(self) -> int:
        return sum(r.amount for r in self.refunds if r.status in ("succeeded", "pending"))

    def to_json(self) -> JsonDict:
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_received": self.amount_received,
            "amount_refunded": self.amount_refunded,
            "currency": self.currency,
            "status": self.status,
            "capture_method": self.capture_method,
            "payment_method": self.payment_method,
            "last_payment_error": self.last_payment_error,
            "next_action": (
                {"type": "use_stripe_sdk"} if self.status == "requires_action" else None
            ),
            "cancellation_reason": self.cancellation_reason,
            "metadata": dict(self.metadata),
            "created": int(self.created.timestamp()),
        }

    def ground_truth(self, psp: str) -> JsonDict:
        return {
            "id": self.id,
            "psp": psp,
            "idempotency_key": self.idempotency_key,
            "payment_id": self.metadata.get("payment_id"),
            "merchant_id": self.metadata.get("merchant_id"),
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "decline_code": (self.last_payment_error or {}).get("decline_code"),
            "amount_authorized": self.amount_capturable,
            "amount_captured": self.amount_received,
            "amount_refunded": self.amount_refunded,
            "disputed": self.disputed,
            "created": self.created.isoformat(),
        }


@dataclass
class IdempotencyEntry:
    fingerprint: str
    http_status: int | None = None
    body: JsonDict | None = None

    @property
    def in_flight(self) -> bool:
        return self.http_status is None


@dataclass
class FaultConfig:
    """Global fault knobs (probabilities 0..1 per API request) for load tests."""

    timeout_rate: float = 0.0
    lost_response_rate: float = 0.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    latency_ms: float = 0.0

    def to_json(self) -> JsonDict:
        return {
            "timeout_rate": self.timeout_rate,
            "lost_response_rate": self.lost_response_rate,
            "error_rate": self.error_rate,
            "rate_limit_rate": self.rate_limit_rate,
            "latency_ms": self.latency_ms,
        }


@dataclass
class SandboxState:
    name: str
    api_key: str
    webhook_secret: str
    faults: FaultConfig
    timeout_hold_s: float
    rng: random.Random
    intents: dict[str, PaymentIntent] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    idempotency: dict[str, IdempotencyEntry] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on shutdown: wakes every request held by a ``timeout`` fault."""

    def reset(self) -> None:
        self.intents.clear()
        self.refunds.clear()
        self.idempotency.clear()
        self.faults = FaultConfig(latency_ms=self.faults.latency_ms)

    def intent(self, intent_id: str) -> PaymentIntent:
        found = self.intents.get(intent_id)
        if found is None:
            raise ApiError(
                404,
                "invalid_request_error",
                f"No such payment_intent: '{intent_id}'",
                code="resource_missing",
                param="intent",
            )
        return found

    def create_intent(
        self,
        *,
        amount: int,
        currency: str,
        payment_method: str,
        capture_method: str,
        metadata: dict[str, str],
        idempotency_key: str | None,
    ) -> PaymentIntent:
        behaviour = TOKENS.get(payment_method)
        if behaviour is None:
            raise ApiError(
                400,
                "invalid_request_error",
                f"No such PaymentMethod: '{payment_method}'",
                code="resource_missing",
                param="payment_method",
            )
        pi = PaymentIntent(
            id=_new_id("pi"),
            idempotency_key=idempotency_key,
            amount=amount,
            currency=currency,
            payment_method=payment_method,
            capture_method=capture_method,
            status="requires_payment_method",
            metadata=metadata,
            created=datetime.now(UTC),
            refund_fails=behaviour.refund_fails,
            disputed=behaviour.disputed,
        )
        self.intents[pi.id] = pi
        if behaviour.result == "requires_action":
            pi.status = "requires_action"
        elif behaviour.result == "decline":
            pi.last_payment_error = {
                "type": "card_error",
                "code": behaviour.code,
                "decline_code": behaviour.decline_code,
                "message": behaviour.message,
            }
            raise ApiError(
                402,
                "card_error",
                behaviour.message or _DECLINED,
                code=behaviour.code,
                decline_code=behaviour.decline_code,
                payment_intent=pi.to_json(),
            )
        elif capture_method == "manual":
            pi.status = "requires_capture"
            pi.amount_capturable = amount
        else:
            pi.status = "succeeded"
            pi.amount_received = amount
        return pi

    def capture(self, intent_id: str, amount_to_capture: int | None) -> PaymentIntent:
        pi = self.intent(intent_id)
        if pi.status != "requires_capture":
            raise _unexpected_state(pi, "capture", "requires_capture")
        amount = pi.amount_capturable if amount_to_capture is None else amount_to_capture
        if amount > pi.amount_capturable:
            raise ApiError(
                400,
                "invalid_request_error",
                f"amount_to_capture ({amount}) exceeds amount_capturable ({pi.amount_capturable}).",
                code="amount_too_large",
                param="amount_to_capture",
                payment_intent=pi.to_json(),
            )
        pi.amount_received = amount
        pi.amount_capturable = 0
        pi.status = "succeeded"
        return pi

    def cancel(self, intent_id: str, reason: str | None) -> PaymentIntent:
        pi = self.intent(intent_id)
        cancellable = ("requires_capture", "requires_action", "requires_payment_method")
        if pi.status not in cancellable:
            raise _unexpected_state(pi, "cancel", ", ".join(cancellable))
        pi.status = "canceled"
        pi.amount_capturable = 0
        pi.cancellation_reason = reason
        return pi

    def refund(
        self, intent_id: str, amount: int | None, idempotency_key: str | None
    ) -> tuple[Refund, str]:
        """Create a refund; returns it and the status to report in this response."""
        pi = self.intent(intent_id)
        if pi.status != "succeeded":
            raise _unexpected_state(pi, "refund", "succeeded")
        remaining = pi.amount_received - pi.amount_refunded
        if remaining <= 0:
            raise ApiError(
                400,
                "invalid_request_error",
                f"PaymentIntent {pi.id} has already been refunded.",
                code="charge_already_refunded",
                payment_intent=pi.to_json(),
            )
        value = remaining if amount is None else amount
        if value > remaining:
            raise ApiError(
                400,
                "invalid_request_error",
                f"Refund amount ({value}) is greater than unrefunded amount ({remaining}).",
                code="amount_too_large",
                param="amount",
                payment_intent=pi.to_json(),
            )
        refund = Refund(
            id=_new_id("re"),
            payment_intent=pi.id,
            amount=value,
            currency=pi.currency,
            status="succeeded",
            created=datetime.now(UTC),
            idempotency_key=idempotency_key,
        )
        reported = "succeeded"
        if pi.refund_fails:
            # Accepted now, failed "later": the response says pending, reads say failed.
            refund.status = "failed"
            refund.failure_reason = "expired_or_canceled_card"
            reported = "pending"
        pi.refunds.append(refund)
        self.refunds[refund.id] = refund
        return refund, reported

    def get_refund(self, refund_id: str) -> Refund:
        found = self.refunds.get(refund_id)
        if found is None:
            raise ApiError(
                404,
                "invalid_request_error",
                f"No such refund: '{refund_id}'",
                code="resource_missing",
                param="id",
            )
        return found


def _unexpected_state(pi: PaymentIntent, action: str, expected: str) -> ApiError:
    return ApiError(
        400,
        "invalid_request_error",
        f"You cannot {action} this PaymentIntent because it has a status of {pi.status}. "
        f"The {action} action requires one of the following statuses: {expected}.",
        code="payment_intent_unexpected_state",
        payment_intent=pi.to_json(),
    )
