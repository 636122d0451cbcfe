"""Executor: call the PSP for one command and turn its answer into payment events.

Every PSP call carries a deterministic attempt id as the PSP's idempotency key, so
re-running a command after a crash or redelivery replays the PSP's first answer instead
of charging again. A timeout or lost response is UNKNOWN, never a failure: the payment
goes to ``pending_verification`` until the PSP's status resolves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import cast

from pydantic import BaseModel

from agents.events import build_event, rejection
from agents.fees import FeeSchedule
from agents.state import (
    TERMINAL,
    PaymentState,
    PendingAttempt,
    PendingRefund,
    TransitionError,
    check_capture,
    check_refund,
    check_void,
    fee_refund_for,
    refunded_status,
)
from psp.protocol import (
    AuthorizeRequest,
    CaptureRequest,
    PspNotification,
    PspResult,
    RefundRequest,
    VoidRequest,
)
from psp.routing import NO_ROUTE_CODE, Router, is_rate_limited
from schemas.commands import (
    AuthorizePayment,
    CapturePayment,
    CommandEnvelope,
    RefundPayment,
)
from schemas.events import EventType, PaymentEvent, PaymentStatus
from schemas.internal import PendingOperation, ResolvePayment

RETRY_DELAYS_SECONDS = (0.05, 0.2)
"""Inline retries of a retryable PSP answer (same attempt id, so safe)."""


def attempt_id(payment_id: str, operation: str, number: int | str) -> str:
    """Our id for one PSP call; also the PSP idempotency key."""
    return f"att_{payment_id}_{operation}_{number}"


TRANSIENT_OUTCOMES = frozenset({"not_sent", "retryable_error"})


def certainly_not_processed(result: PspResult) -> bool:
    """The PSP certainly did nothing: not sent, or refused before processing (429)."""
    return result.outcome == "not_sent" or is_rate_limited(result)


def is_recorded_decline(result: PspResult) -> bool:
    """A retryable decline (``processing_error``) the PSP recorded under the key: nothing
    was charged, and the same key would replay it, so a retry must be a new attempt."""
    return (
        result.outcome == "retryable_error"
        and result.psp_reference is not None
        and not is_rate_limited(result)
        and result.decline_code not in (None, "api_error")
    )


def may_have_been_processed(result: PspResult) -> bool:
    """Unknown, or a 5xx without a recorded outcome: the PSP may have done it."""
    if result.outcome == "unknown":
        return True
    return (
        result.outcome == "retryable_error"
        and not is_rate_limited(result)
        and not is_recorded_decline(result)
    )


def is_positive_answer(operation: str, result: PspResult) -> bool:
    """Whether ``result`` (to a re-sent request) states the attempt's outcome.

    Only such an answer may settle a pending payment; a failed lookup (5xx, 429,
    connection refused, a key still in flight, a timeout) is never taken for one.
    """
    if result.outcome in ("succeeded", "declined"):
        return True
    if operation == "authorize":
        return result.outcome == "requires_action" or is_recorded_decline(result)
    return False


class RetryLater(Exception):  # noqa: N818 - a signal, not an error
    """The PSP call hit a transient failure: retry the command later (a retry tier).

    Raised before any state change is kept, so the retried command runs again from the
    same state with the same attempt ids: the PSP's idempotency keys and the attempt
    claims make the repeat safe.
    """

    def __init__(
        self, reason: str, decline_code: str | None = None, attempts: int = 0
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decline_code = decline_code
        self.attempts = attempts
        """Attempt ids used so far: the retry continues numbering after them, so a retry
        after a recorded retryable decline is a fresh attempt, not a replay of it."""


class Executor:
    """Runs commands against the PSP and builds the resulting events."""

    def __init__(
        self, router: Router, fee_bps: int, fee_fixed: int, fees: FeeSchedule | None = None
    ) -> None:
        """``fees``: the merchants' fee terms; without it, ``fee_bps`` and the per-currency
        defaults (``fee_fixed`` is the USD-cents default, scaled for other currencies)."""
        self._router = router
        self.fees = fees if fees is not None else FeeSchedule(fee_bps, fee_fixed)

    # -- event construction ------------------------------------------------------------
    @staticmethod
    def event(
        state: PaymentState,
        envelope: CommandEnvelope,
        event_type: EventType,
        status: PaymentStatus,
        **extra: object,
    ) -> PaymentEvent:
        """The next event of ``state``: bumps its sequence and sets its status."""
        if event_type == "payment.captured":
            fee = extra.get("fee", 0)
            state.fees += fee if isinstance(fee, int) else 0
        state.sequence += 1
        state.status = status
        return build_event(state, envelope, event_type, status, **extra)

    async def _call_with_retries(
        self,
        state: PaymentState,
        call: Callable[[str, str | None], Awaitable[PspResult]],
        operation: str,
    ) -> PspResult:
        """Call the PSP (``call(attempt_id, pinned_psp)``); retry retryable answers.

        * A 5xx left no outcome under the idempotency key, but the PSP may have processed
          the request: the retry reuses the attempt id AND is pinned to the same PSP, so a
          request that did get through is replayed there, never repeated elsewhere.
        * A 429 was refused before processing: same attempt id, any PSP.
        * A retryable decline (``processing_error``) is an outcome the PSP recorded for that
          key: the retry is a new attempt with a new id, routed afresh.
        """
        state.attempts += 1
        result = await call(attempt_id(state.payment_id, operation, state.attempts), None)
        for delay in RETRY_DELAYS_SECONDS:
            if result.outcome != "retryable_error":
                break
            await asyncio.sleep(min(result.retry_after or delay, 1.0))
            pinned: str | None = None
            if result.psp_reference is not None:
                state.attempts += 1
            elif not is_rate_limited(result):
                pinned = result.psp
            result = await call(attempt_id(state.payment_id, operation, state.attempts), pinned)
        return result

    # -- commands ------------------------------------------------------------------------
    async def authorize(self, state: PaymentState, command: AuthorizePayment) -> PaymentEvent:
        state.amount = command.amount
        state.currency = command.currency
        state.capture_method = command.capture_method

        def authorize(attempt: str, pinned: str | None) -> Awaitable[PspResult]:
            return self._router.authorize(
                AuthorizeRequest(
                    attempt_id=attempt,
                    payment_id=command.payment_id,
                    merchant_id=command.merchant_id,
                    amount=command.amount,
                    currency=command.currency,
                    payment_method=command.payment_method,
                    capture_method=command.capture_method,
                ),
                psp=pinned,
            )

        result = await self._call_with_retries(state, authorize, "authorize")
        if result.decline_code == NO_ROUTE_CODE:
            return self.event(
                state, command, "payment.declined", "declined",
                decline_code=NO_ROUTE_CODE, reason=result.message,
            )
        if certainly_not_processed(result) or is_recorded_decline(result):
            # Nothing was charged: retry later from a tier, as a fresh attempt.
            raise RetryLater(
                f"psp_{result.outcome}: {result.message or result.decline_code or 'no detail'}",
                result.decline_code, attempts=state.attempts,
            )
        state.psp = result.psp or None
        if may_have_been_processed(result):
            state.pending = pending_attempt(
                state, command, "authorize", command.amount,
                request=AuthorizeRequest(
                    attempt_id=attempt_id(state.payment_id, "authorize", state.attempts),
                    payment_id=command.payment_id, merchant_id=command.merchant_id,
                    amount=command.amount, currency=command.currency,
                    payment_method=command.payment_method,
                    capture_method=command.capture_method,
                ).model_dump_json(),
            )
            return self.event(
                state, command, "payment.pending_verification", "pending_verification",
                reason=f"PSP outcome unknown ({result.message or result.outcome}); verifying",
            )
        return self._authorize_outcome(state, command, result, command.amount)

    def _authorize_outcome(
        self, state: PaymentState, envelope: CommandEnvelope, result: PspResult, amount: int
    ) -> PaymentEvent:
        """The event for an authorization the PSP has answered (directly or when re-sent)."""
        if result.psp_reference:
            state.psp_reference = result.psp_reference
        if result.outcome == "succeeded" and result.status == "canceled":
            return self.event(state, envelope, "payment.canceled", "canceled")
        match result.outcome:
            case "succeeded" if state.capture_method == "automatic":
                state.amount_captured = amount
                fee = self.fees.fee(state.merchant_id, state.currency, amount)
                return self.event(
                    state, envelope, "payment.captured", "captured",
                    fee=fee, amount_captured_now=amount,
                )
            case "succeeded":
                state.authorized_at = datetime.now(UTC)
                return self.event(state, envelope, "payment.authorized", "authorized")
            case "requires_action":
                return self.event(state, envelope, "payment.requires_action", "requires_action")
            case _:  # declined, or a recorded retryable decline
                return self.event(
                    state, envelope, "payment.declined", "declined",
                    decline_code=result.decline_code, reason=result.message,
                )

    async def capture(self, state: PaymentState, command: CapturePayment) -> PaymentEvent:
        try:
            amount = check_capture(state, command.amount)
        except TransitionError as exc:
            return rejection(state, command, str(exc))
        if state.psp_reference is None or state.psp is None:
            return rejection(state, command, "state_violation: no PSP reference to capture")
        reference = state.psp_reference
        adapter = self._router.adapter(state.psp)  # captures go where the authorization is

        def capture(attempt: str, _pinned: str | None) -> Awaitable[PspResult]:
            return adapter.capture(
                CaptureRequest(
                    attempt_id=attempt,
                    payment_id=command.payment_id,
                    psp_reference=reference,
                    amount=amount,
                )
            )

        result = await self._call_with_retries(state, capture, "capture")
        if certainly_not_processed(result):
            raise RetryLater(
                f"capture psp_{result.outcome}: {result.message or 'no detail'}",
                result.decline_code,
            )
        if may_have_been_processed(result):
            request = CaptureRequest(
                attempt_id=attempt_id(state.payment_id, "capture", state.attempts),
                payment_id=command.payment_id, psp_reference=reference, amount=amount,
            )
            return self._verify(state, command, "capture", amount, request, result)
        return self._capture_outcome(state, command, result, amount)

    def _capture_outcome(
        self, state: PaymentState, envelope: CommandEnvelope, result: PspResult, amount: int
    ) -> PaymentEvent:
        if result.outcome == "succeeded":
            state.amount_captured += amount
            fee = self.fees.fee(state.merchant_id, state.currency, amount)
            return self.event(
                state, envelope, "payment.captured", "captured",
                fee=fee, amount_captured_now=amount,
            )
        return self.event(
            state, envelope, "payment.failed", "authorized",
            decline_code=result.decline_code,
            reason=f"capture failed: psp_{result.outcome}: {result.message or 'no detail'}",
        )

    def _verify(
        self, state: PaymentState, envelope: CommandEnvelope, operation: str, amount: int,
        request: BaseModel, result: PspResult, refund_id: str | None = None,
    ) -> PaymentEvent:
        """The outcome is unknown: the attempt waits until the PSP states it (the resolver
        re-sends ``request`` under the same attempt id).

        The payment's status becomes ``pending_verification``, except for a refund: the
        payment stays ``captured`` / ``partially_refunded`` (its capture is not in doubt,
        as with a Stripe refund that is pending) and the event says which refund is being
        verified; its amount counts as spent until then.
        """
        state.pending = pending_attempt(
            state, envelope, operation, amount,
            request=request.model_dump_json(), refund_id=refund_id,
            attempt=str(getattr(request, "attempt_id", "")),
        )
        status: PaymentStatus = (
            state_status(state) if operation == "refund" else "pending_verification"
        )
        return self.event(
            state, envelope, "payment.pending_verification", status,
            reason=f"{operation} outcome unknown ({result.message or result.outcome}); "
            "verifying", refund_id=refund_id,
        )

    async def void(
        self, state: PaymentState, envelope: CommandEnvelope, reason: str | None = None
    ) -> PaymentEvent:
        """Cancel an uncaptured authorization (a void command, or an expiry).

        The attempt id is one per payment, so a merchant's void and an expiry void, or a
        void retried after a crash, are one cancellation at the PSP.
        """
        try:
            check_void(state)
        except TransitionError as exc:
            return rejection(state, envelope, str(exc))
        if state.psp_reference is None or state.psp is None:
            return rejection(state, envelope, "state_violation: no PSP reference to void")
        adapter = self._router.adapter(state.psp)
        request = VoidRequest(
            attempt_id=attempt_id(state.payment_id, "void", 1), payment_id=state.payment_id,
            psp_reference=state.psp_reference,
        )
        result = await _single_call(lambda _attempt: adapter.void(request), request.attempt_id)
        if certainly_not_processed(result):
            raise RetryLater(f"void psp_{result.outcome}: {result.message or 'no detail'}")
        if may_have_been_processed(result):
            return self._verify(state, envelope, "void", 0, request, result)
        return self._void_outcome(state, envelope, result, reason)

    def _void_outcome(
        self, state: PaymentState, envelope: CommandEnvelope, result: PspResult,
        reason: str | None,
    ) -> PaymentEvent:
        if result.outcome == "succeeded":
            return self.event(state, envelope, "payment.canceled", "canceled", reason=reason)
        return self.event(
            state, envelope, "payment.failed", "authorized",
            decline_code=result.decline_code,
            reason=f"void failed: psp_{result.outcome}: {result.message or 'no detail'}",
        )

    async def refund(self, state: PaymentState, command: RefundPayment) -> PaymentEvent | None:
        """Refund part or all of the captured amount; None while the PSP says pending."""
        if state.pending is not None:
            return rejection(
                state, command,
                f"state_violation: an earlier {state.pending.operation} of this payment is "
                "being verified with the PSP; retry once it is settled",
            )
        if command.refund_id in state.refunds or command.refund_id in state.pending_refunds:
            return rejection(
                state, command,
                f"state_violation: refund_id {command.refund_id} was already used on this "
                "payment with another idempotency_key",
            )
        try:
            amount = check_refund(state, command.amount)
        except TransitionError as exc:
            return rejection(state, command, str(exc))
        if state.psp_reference is None or state.psp is None:
            return rejection(state, command, "state_violation: no PSP reference to refund")
        adapter = self._router.adapter(state.psp)
        # One attempt id per refund_id: a retried or re-executed refund command is the same
        # refund at the PSP, never a second one.
        request = RefundRequest(
            attempt_id=attempt_id(state.payment_id, "refund", command.refund_id),
            payment_id=state.payment_id, psp_reference=state.psp_reference, amount=amount,
        )
        result = await _single_call(lambda _attempt: adapter.refund(request), request.attempt_id)
        if certainly_not_processed(result):
            raise RetryLater(f"refund psp_{result.outcome}: {result.message or 'no detail'}")
        if may_have_been_processed(result):
            return self._verify(state, command, "refund", amount, request, result,
                                refund_id=command.refund_id)
        return self._refund_outcome(state, command, command.refund_id, result, amount)

    def _refund_outcome(
        self, state: PaymentState, envelope: CommandEnvelope, refund_id: str,
        result: PspResult, amount: int,
    ) -> PaymentEvent | None:
        if result.outcome == "succeeded" and result.status == "pending":
            state.pending_refunds[refund_id] = PendingRefund(
                refund_id=refund_id,
                refund_reference=result.refund_reference,
                amount=amount,
                command_id=envelope.command_id,
                idempotency_key=envelope.idempotency_key,
                command_created_at=envelope.created_at,
            )
            return None
        if result.outcome == "succeeded":
            return self._refunded(state, envelope, refund_id, amount)
        return self.event(
            state, envelope, "payment.refund_failed", state_status(state),
            refund_id=refund_id, decline_code=result.decline_code,
            reason=f"refund failed: {result.message or result.decline_code or 'declined'}",
        )

    def _refunded(
        self, state: PaymentState, envelope: CommandEnvelope, refund_id: str, amount: int
    ) -> PaymentEvent:
        fee_refund = fee_refund_for(state, amount)
        state.amount_refunded += amount
        state.fees_refunded += fee_refund
        state.refunds[refund_id] = amount
        return self.event(
            state, envelope, "payment.refunded", refunded_status(state),
            refund_id=refund_id, amount_refunded_now=amount, fee_refunded_now=fee_refund,
        )

    # -- PSP notifications (verified webhooks) ------------------------------------------
    def apply_notification(
        self, state: PaymentState, note: PspNotification
    ) -> PaymentEvent | None:
        """Apply a PSP webhook to the payment; None when it changes nothing.

        Webhooks only move a payment forward out of a state where we are waiting for the
        PSP (an unknown outcome, 3-D Secure, a pending refund). Duplicates, late arrivals
        and anything that would move a terminal or later state backwards are no-ops:
        ordering comes from the state machine, not from arrival order.
        """
        if note.type == "charge.refund.updated":
            return self._refund_update(state, note)
        if not note.type.startswith("payment_intent."):
            return None  # disputes, payouts, ...: not payment state changes here
        if state.psp_reference is not None and note.psp_reference not in (
            None, state.psp_reference
        ):
            return None  # about another PaymentIntent (e.g. a failed-over attempt)
        if state.status == "pending_verification" and state.pending is not None:
            return self._settle_by_webhook(state, state.pending, note)
        if state.status == "requires_action":
            return self._after_action(state, note)
        return None

    def _after_action(self, state: PaymentState, note: PspNotification) -> PaymentEvent | None:
        """The customer finished (or abandoned) 3-D Secure."""
        envelope = self._origin_envelope(state)
        if envelope is None:
            return None
        if note.psp_reference:
            state.psp_reference = note.psp_reference
        match note.status:
            case "succeeded":
                state.amount_captured = state.amount
                fee = self.fees.fee(state.merchant_id, state.currency, state.amount)
                return self.event(state, envelope, "payment.captured", "captured",
                                  fee=fee, amount_captured_now=state.amount)
            case "requires_capture":
                state.authorized_at = datetime.now(UTC)
                return self.event(state, envelope, "payment.authorized", "authorized")
            case "canceled":
                return self.event(state, envelope, "payment.canceled", "canceled")
            case "requires_payment_method":
                return self.event(state, envelope, "payment.declined", "declined",
                                  reason="3-D Secure failed or was abandoned")
            case _:
                return None

    def _refund_update(self, state: PaymentState, note: PspNotification) -> PaymentEvent | None:
        pending = next(
            (p for p in state.pending_refunds.values() if p.refund_reference == note.object_id),
            None,
        ) if note.object_id else None
        if pending is None:
            # Keyed by the PaymentIntent: the refund is found by its reference only.
            return None
        if note.status not in ("succeeded", "failed", "canceled"):
            return None
        del state.pending_refunds[pending.refund_id]
        envelope = CommandEnvelope(
            type="refund_payment", schema_version=1, command_id=pending.command_id,
            merchant_id=state.merchant_id, idempotency_key=pending.idempotency_key,
            payment_id=state.payment_id, created_at=pending.command_created_at,
        )
        if note.status == "succeeded":
            return self._refunded(state, envelope, pending.refund_id, pending.amount)
        return self.event(
            state, envelope, "payment.refund_failed", state_status(state),
            refund_id=pending.refund_id, reason="the PSP reported the refund failed",
        )

    @staticmethod
    def _origin_envelope(state: PaymentState) -> CommandEnvelope | None:
        """The envelope of the command that created the payment (events answer it)."""
        for key, record in state.commands.items():
            if record.events:
                first = PaymentEvent.model_validate_json(record.events[0])
                return CommandEnvelope(
                    type="authorize_payment", schema_version=1, command_id=first.command_id,
                    merchant_id=state.merchant_id, idempotency_key=key,
                    payment_id=state.payment_id,
                    created_at=first.command_created_at or first.occurred_at,
                )
        return None

    def _settle_by_webhook(
        self, state: PaymentState, pending: PendingAttempt, note: PspNotification
    ) -> PaymentEvent | None:
        """A webhook settles a pending authorization only if it is about that very attempt.

        The PSP echoes our attempt id (its metadata): a late webhook of an earlier attempt
        (say a retryable decline, superseded by a new attempt) must not settle the new
        one. Other pending operations (capture, void, refund) are settled by re-sending
        their request; a webhook without our attempt id settles nothing.
        """
        if pending.operation != "authorize" or note.attempt_id != pending.attempt_id:
            return None
        if note.psp_reference is None or note.status is None:
            return None
        outcome = {
            "succeeded": "succeeded", "requires_capture": "succeeded",
            "canceled": "succeeded", "requires_action": "requires_action",
            "requires_payment_method": "declined",
        }.get(note.status)
        if outcome is None:
            return None
        result = PspResult.model_validate({
            "outcome": outcome, "psp": note.psp, "psp_reference": note.psp_reference,
            "status": note.status,
            "decline_code": "card_declined" if outcome == "declined" else None,
            "message": f"PSP webhook {note.type}",
        })
        return self.resolve(state, ResolvePayment(
            payment_id=state.payment_id, attempt_id=pending.attempt_id,
            operation="authorize", psp=note.psp, result=result.model_dump_json(),
            source="webhook",
        ))

    # -- unknown outcomes ---------------------------------------------------------------
    def resolve(self, state: PaymentState, answer: ResolvePayment) -> PaymentEvent | None:
        """Apply the PSP's answer about a pending attempt; None when it is stale.

        ``answer.result`` is the PSP's own statement of the outcome (the resolver sends
        nothing else), applied exactly as if the original call had returned it.
        """
        pending = state.pending
        if (
            pending is None
            or pending.attempt_id != answer.attempt_id
            or state.status in TERMINAL  # terminal states never move
        ):
            return None  # already resolved, or an answer about another attempt
        result = PspResult.model_validate_json(answer.result)
        if not is_positive_answer(pending.operation, result):
            return None  # never settle on a failed lookup
        envelope = CommandEnvelope(
            type=_COMMAND_TYPES[pending.operation],
            schema_version=1,
            command_id=pending.command_id,
            merchant_id=state.merchant_id,
            idempotency_key=pending.idempotency_key,
            payment_id=state.payment_id,
            created_at=pending.command_created_at,
        )
        state.pending = None
        if pending.prior_status is not None:
            state.status = pending.prior_status  # type: ignore[assignment]
        if pending.operation == "authorize":
            state.psp = result.psp or state.psp
            return self._authorize_outcome(state, envelope, result, pending.amount)
        if pending.operation == "capture":
            return self._capture_outcome(state, envelope, result, pending.amount)
        if pending.operation == "void":
            reason = "authorization_expired" if pending.idempotency_key == EXPIRY_KEY else None
            return self._void_outcome(state, envelope, result, reason)
        return self._refund_outcome(
            state, envelope, pending.refund_id or "", result, pending.amount
        )


_COMMAND_TYPES: dict[str, str] = {
    "authorize": "authorize_payment", "capture": "capture_payment",
    "void": "void_payment", "refund": "refund_payment",
}

EXPIRY_KEY = "paystream:expiry"
"""The idempotency key of the void an expiry makes. Merchant keys may not start with
``paystream:`` (intake rejects them), so it never collides with a merchant's key."""


async def _single_call(
    call: Callable[[str], Awaitable[PspResult]], attempt: str
) -> PspResult:
    """One call plus short inline retries of a 5xx/429 under the SAME attempt id."""
    result = await call(attempt)
    for delay in RETRY_DELAYS_SECONDS:
        if result.outcome != "retryable_error" or result.psp_reference is not None:
            break
        await asyncio.sleep(min(result.retry_after or delay, 1.0))
        result = await call(attempt)
    return result


def state_status(state: PaymentState) -> PaymentStatus:
    """The payment's current status as an event status (never ``created``)."""
    return "rejected" if state.status == "created" else state.status


def pending_attempt(
    state: PaymentState, command: CommandEnvelope, operation: str, amount: int, *,
    request: str, refund_id: str | None = None, attempt: str = "",
) -> PendingAttempt:
    """The attempt just made, to settle by re-sending ``request`` (same attempt id)."""
    return PendingAttempt(
        operation=cast(PendingOperation, operation),
        attempt_id=attempt or attempt_id(state.payment_id, operation, state.attempts),
        amount=amount,
        command_id=command.command_id,
        idempotency_key=command.idempotency_key,
        command_created_at=command.created_at,
        request=request,
        refund_id=refund_id,
        prior_status=None if state.status == "created" else state.status,
        since=datetime.now(UTC),
    )
