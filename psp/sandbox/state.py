"""In-memory state of one sandbox PSP: payment intents, refunds, disputes, payouts,
idempotency records, faults and the webhook events it emitted.

All mutations are synchronous (no ``await`` inside), so on a single event loop every API
operation is atomic. Business rules (magic tokens, capture / cancel / refund rules) live
here too and raise :class:`ApiError` with Stripe's error shape.

Every state change emits a Stripe-shaped webhook event (:meth:`SandboxState.emit`),
recorded in ``events`` and handed to the ``sink`` (the app's webhook dispatcher, when
running). Asynchronous outcomes (a dispute on a ``tok_createDispute`` charge, the failure
of a ``tok_refundFail`` refund's webhook, a payout's resolution) are run by
``sink.later`` after ``async_delay_s``; without a sink they happen at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from typing import Any, Literal, Protocol

from psp.settlement import SettlementRow

JsonDict = dict[str, Any]

API_VERSION = "2024-06-20"
"""The Stripe API version the sandbox's objects and events claim to follow."""


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


BANK_TOKENS: dict[str, bool] = {"btok_ok": True, "btok_fail": False}
"""Payout destinations understood by the sandbox: token -> whether the payout succeeds."""


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())


def charge_id(intent_id: str) -> str:
    """The id of the (single) charge of a payment intent: ``pi_X`` -> ``ch_X``."""
    return "ch_" + intent_id.removeprefix("pi_")


def fee_for(amount: int, fee_bps: int, fee_fixed: int) -> int:
    """``amount * fee_bps / 10_000`` rounded half-up, plus ``fee_fixed`` (integers only)."""
    return (amount * fee_bps + 5_000) // 10_000 + fee_fixed


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
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self, *, status: str | None = None) -> JsonDict:
        return {
            "id": self.id,
            "object": "refund",
            "metadata": dict(self.metadata),
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
    captured_at: datetime | None = None

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

    def charge_json(self) -> JsonDict:
        """A Stripe ``charge`` object for this intent (used by ``charge.*`` events)."""
        return {
            "id": charge_id(self.id),
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount_received,
            "amount_refunded": self.amount_refunded,
            "captured": self.amount_received > 0,
            "refunded": 0 < self.amount_received <= self.amount_refunded,
            "currency": self.currency,
            "payment_intent": self.id,
            "payment_method": self.payment_method,
            "status": "succeeded" if self.amount_received > 0 else "pending",
            "metadata": dict(self.metadata),
            "refunds": {
                "object": "list",
                "data": [r.to_json() for r in self.refunds],
                "has_more": False,
            },
            "created": _unix(self.created),
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
class Dispute:
    id: str
    payment_intent: str
    amount: int
    currency: str
    created: datetime
    status: str = "needs_response"
    reason: str = "fraudulent"

    def to_json(self) -> JsonDict:
        return {
            "id": self.id,
            "object": "dispute",
            "amount": self.amount,
            "currency": self.currency,
            "charge": charge_id(self.payment_intent),
            "payment_intent": self.payment_intent,
            "reason": self.reason,
            "status": self.status,
            "created": _unix(self.created),
        }


@dataclass
class Payout:
    id: str
    amount: int
    currency: str
    destination: str
    metadata: dict[str, str]
    created: datetime
    idempotency_key: str | None
    status: str = "pending"
    failure_code: str | None = None
    failure_message: str | None = None

    def to_json(self) -> JsonDict:
        return {
            "id": self.id,
            "object": "payout",
            "amount": self.amount,
            "currency": self.currency,
            "destination": self.destination,
            "status": self.status,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "metadata": dict(self.metadata),
            "arrival_date": _unix(self.created),
            "created": _unix(self.created),
        }


@dataclass
class WebhookEvent:
    """One emitted event; ``body`` is its exact JSON, identical on every delivery."""

    id: str
    type: str
    created: datetime
    body: bytes
    copies: int = 0
    """Deliveries scheduled: 1, or 2 when duplicated (0 when no webhook URL was set)."""
    attempts: int = 0
    delivered: int = 0
    """Copies the receiver acknowledged with a 2xx."""
    last_status: int | None = None
    last_error: str | None = None
    url: str | None = None

    @property
    def payload(self) -> JsonDict:
        loaded: JsonDict = json.loads(self.body)
        return loaded

    def summary(self) -> JsonDict:
        return {
            "id": self.id,
            "type": self.type,
            "created": _unix(self.created),
            "url": self.url,
            "copies": self.copies,
            "attempts": self.attempts,
            "delivered": self.delivered,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "object_id": self.payload["data"]["object"].get("id"),
        }


@dataclass
class WebhookConfig:
    """Webhook delivery knobs (``POST /sandbox/webhooks/config``)."""

    url: str | None = None
    duplicate_rate: float = 0.0
    """Probability (0..1) that an event is delivered twice (same event id)."""
    reorder: bool = False
    """Buffer up to ``reorder_window`` events and deliver them shuffled."""
    reorder_window: int = 4
    reorder_flush_ms: float = 20.0
    """A partly filled reorder buffer is flushed after this long without new events."""
    delay_ms: float = 0.0
    """Delay before the first delivery attempt of each event."""
    max_attempts: int = 4
    retry_backoff_ms: float = 100.0
    """Backoff before the 2nd attempt; doubled for each further attempt."""

    def to_json(self) -> JsonDict:
        return {
            "url": self.url,
            "duplicate_rate": self.duplicate_rate,
            "reorder": self.reorder,
            "reorder_window": self.reorder_window,
            "reorder_flush_ms": self.reorder_flush_ms,
            "delay_ms": self.delay_ms,
            "max_attempts": self.max_attempts,
            "retry_backoff_ms": self.retry_backoff_ms,
        }


class EventSink(Protocol):
    """Where the state hands emitted events and deferred work (the webhook dispatcher)."""

    def publish(self, event: WebhookEvent) -> None: ...

    def later(self, delay_s: float, action: Callable[[], None]) -> None: ...


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
    fee_bps: int = 290
    fee_fixed: int = 30
    dispute_fee: int = 1500
    async_delay_s: float = 0.0
    """Delay of asynchronous outcomes: disputes, failed-refund webhooks, payout results."""
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    disputes: dict[str, Dispute] = field(default_factory=dict)
    payouts: dict[str, Payout] = field(default_factory=dict)
    events: dict[str, WebhookEvent] = field(default_factory=dict)
    sink: EventSink | None = None
    generation: int = 0
    """Bumped by :meth:`reset`: deferred work from before a reset is dropped."""

    def reset(self) -> None:
        self.generation += 1
        self.intents.clear()
        self.refunds.clear()
        self.disputes.clear()
        self.payouts.clear()
        self.events.clear()
        self.idempotency.clear()
        self.faults = FaultConfig(latency_ms=self.faults.latency_ms)

    # --- events -----------------------------------------------------------------------

    def emit(self, event_type: str, obj: JsonDict) -> WebhookEvent:
        """Record a Stripe-shaped event about ``obj`` and hand it to the sink."""
        created = datetime.now(UTC)
        event_id = _new_id("evt")
        payload: JsonDict = {
            "id": event_id,
            "object": "event",
            "api_version": API_VERSION,
            "created": _unix(created),
            "livemode": False,
            "type": event_type,
            "data": {"object": obj},
        }
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        event = WebhookEvent(id=event_id, type=event_type, created=created, body=body)
        self.events[event_id] = event
        if self.sink is not None:
            self.sink.publish(event)
        return event

    def later(self, action: Callable[[], None]) -> None:
        """Run ``action`` after ``async_delay_s`` (at once without a sink), unless reset."""
        generation = self.generation

        def guarded() -> None:
            if self.generation == generation:
                action()

        if self.sink is None:
            guarded()
        else:
            self.sink.later(self.async_delay_s, guarded)

    def _captured(self, pi: PaymentIntent) -> None:
        pi.captured_at = datetime.now(UTC)
        self.emit("payment_intent.succeeded", pi.to_json())
        if pi.disputed:
            self.later(lambda: self._open_dispute(pi))

    def _open_dispute(self, pi: PaymentIntent) -> None:
        dispute = Dispute(
            id=_new_id("dp"),
            payment_intent=pi.id,
            amount=pi.amount_received,
            currency=pi.currency,
            created=datetime.now(UTC),
        )
        self.disputes[dispute.id] = dispute
        self.emit("charge.dispute.created", dispute.to_json())

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
            self.emit("payment_intent.requires_action", pi.to_json())
        elif behaviour.result == "decline":
            pi.last_payment_error = {
                "type": "card_error",
                "code": behaviour.code,
                "decline_code": behaviour.decline_code,
                "message": behaviour.message,
            }
            self.emit("payment_intent.payment_failed", pi.to_json())
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
            self.emit("payment_intent.amount_capturable_updated", pi.to_json())
        else:
            pi.status = "succeeded"
            pi.amount_received = amount
            self._captured(pi)
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
        self._captured(pi)
        return pi

    def cancel(self, intent_id: str, reason: str | None) -> PaymentIntent:
        pi = self.intent(intent_id)
        cancellable = ("requires_capture", "requires_action", "requires_payment_method")
        if pi.status not in cancellable:
            raise _unexpected_state(pi, "cancel", ", ".join(cancellable))
        pi.status = "canceled"
        pi.amount_capturable = 0
        pi.cancellation_reason = reason
        self.emit("payment_intent.canceled", pi.to_json())
        return pi

    def refund(
        self,
        intent_id: str,
        amount: int | None,
        idempotency_key: str | None,
        metadata: dict[str, str] | None = None,
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
            metadata=dict(metadata or {}),
        )
        reported = "succeeded"
        if pi.refund_fails:
            # Accepted now, failed "later": the response says pending, reads say failed
            # at once (read-your-writes), the charge.refund.updated webhook comes later.
            refund.status = "failed"
            refund.failure_reason = "expired_or_canceled_card"
            reported = "pending"
        pi.refunds.append(refund)
        self.refunds[refund.id] = refund
        if pi.refund_fails:
            self.later(partial(self._refund_failed, refund))
        else:
            self.emit("charge.refunded", pi.charge_json())
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

    def _refund_failed(self, refund: Refund) -> None:
        self.emit("charge.refund.updated", refund.to_json())

    # --- payouts ----------------------------------------------------------------------

    def create_payout(
        self,
        *,
        amount: int,
        currency: str,
        destination: str,
        metadata: dict[str, str],
        idempotency_key: str | None,
    ) -> Payout:
        """A ``pending`` payout; it becomes ``paid`` or ``failed`` later (with a webhook)."""
        succeeds = BANK_TOKENS.get(destination)
        if succeeds is None:
            raise ApiError(
                400,
                "invalid_request_error",
                f"No such external account: '{destination}'",
                code="resource_missing",
                param="destination",
            )
        payout = Payout(
            id=_new_id("po"),
            amount=amount,
            currency=currency,
            destination=destination,
            metadata=metadata,
            created=datetime.now(UTC),
            idempotency_key=idempotency_key,
        )
        self.payouts[payout.id] = payout
        self.emit("payout.created", payout.to_json())
        self.later(lambda: self._resolve_payout(payout, succeeds))
        return payout

    def _resolve_payout(self, payout: Payout, succeeds: bool) -> None:
        if succeeds:
            payout.status = "paid"
            self.emit("payout.paid", payout.to_json())
        else:
            payout.status = "failed"
            payout.failure_code = "account_closed"
            payout.failure_message = "The bank account has been closed."
            self.emit("payout.failed", payout.to_json())

    def get_payout(self, payout_id: str) -> Payout:
        found = self.payouts.get(payout_id)
        if found is None:
            raise ApiError(
                404,
                "invalid_request_error",
                f"No such payout: '{payout_id}'",
                code="resource_missing",
                param="id",
            )
        return found

    # --- settlement -------------------------------------------------------------------

    def settlement_rows(self, day: date | None = None) -> list[SettlementRow]:
        """The settlement report's rows (see :mod:`psp.settlement`), on ``day`` (UTC) or all.

        Charges carry ``fee_bps``/``fee_fixed`` on the captured amount, disputes
        ``dispute_fee``; refunds and payouts carry no fee. Failed refunds and payouts are
        listed with their status (they move no money).
        """
        rows: list[SettlementRow] = []
        for pi in self.intents.values():
            if pi.captured_at is not None and pi.amount_received > 0:
                rows.append(
                    SettlementRow(
                        reference=pi.id,
                        type="charge",
                        amount=pi.amount_received,
                        currency=pi.currency,
                        fee=fee_for(pi.amount_received, self.fee_bps, self.fee_fixed),
                        status="succeeded",
                        timestamp=pi.captured_at,
                    )
                )
        for refund in self.refunds.values():
            rows.append(
                SettlementRow(
                    reference=refund.id,
                    type="refund",
                    amount=refund.amount,
                    currency=refund.currency,
                    fee=0,
                    status=refund.status,
                    timestamp=refund.created,
                )
            )
        for dispute in self.disputes.values():
            rows.append(
                SettlementRow(
                    reference=dispute.payment_intent,
                    type="dispute",
                    amount=dispute.amount,
                    currency=dispute.currency,
                    fee=self.dispute_fee,
                    status=dispute.status,
                    timestamp=dispute.created,
                )
            )
        for payout in self.payouts.values():
            rows.append(
                SettlementRow(
                    reference=payout.id,
                    type="payout",
                    amount=payout.amount,
                    currency=payout.currency,
                    fee=0,
                    status=payout.status,
                    timestamp=payout.created,
                )
            )
        if day is not None:
            rows = [row for row in rows if row.timestamp.astimezone(UTC).date() == day]
        rows.sort(key=lambda row: (row.timestamp, row.type, row.reference))
        return rows


def _unexpected_state(pi: PaymentIntent, action: str, expected: str) -> ApiError:
    return ApiError(
        400,
        "invalid_request_error",
        f"You cannot {action} this PaymentIntent because it has a status of {pi.status}. "
        f"The {action} action requires one of the following statuses: {expected}.",
        code="payment_intent_unexpected_state",
        payment_intent=pi.to_json(),
    )
