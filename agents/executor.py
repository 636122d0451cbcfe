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

from agents.events import build_event, rejection
from agents.state import (
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
from schemas.internal import ResolvePayment
from schemas.money import fee_for

RETRY_DELAYS_SECONDS = (0.05, 0.2)
"""Inline retries of a retryable PSP answer (same attempt id, so safe)."""


def attempt_id(payment_id: str, operation: str, number: int | str) -> str:
    """Our id for one PSP call; also the PSP idempotency key."""
    return f"att_{payment_id}_{operation}_{number}"


TRANSIENT_OUTCOMES = frozenset({"not_sent", "retryable_error"})


class RetryLater(Exception):  # noqa: N818 - a signal, not an error
    """The PSP call hit a transient failure: retry the command later (a retry tier).

    Raised before any state change is kept, so the retried command runs again from the
    same state with the same attempt ids: the PSP's idempotency keys and the attempt
    claims make the repeat safe.
    """

    def __init__(self, reason: str, decline_code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.decline_code = decline_code


class Executor:
    """Runs commands against the PSP and builds the resulting events."""

    def __init__(self, router: Router, fee_bps: int, fee_fixed: int) -> None:
        self._router = router
        self._fee_bps = fee_bps
        self._fee_fixed = fee_fixed

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
        if result.outcome in TRANSIENT_OUTCOMES:
            raise RetryLater(
                f"psp_{result.outcome}: {result.message or 'no detail'}", result.decline_code
            )
        state.psp = result.psp or None
        if result.psp_reference:
            state.psp_reference = result.psp_reference
        match result.outcome:
            case "succeeded" if command.capture_method == "automatic":
                state.amount_captured = command.amount
                fee = fee_for(command.amount, self._fee_bps, self._fee_fixed)
                return self.event(
                    state, command, "payment.captured", "captured",
                    fee=fee, amount_captured_now=command.amount,
                )
            case "succeeded":
                state.authorized_at = datetime.now(UTC)
                return self.event(state, command, "payment.authorized", "authorized")
            case "requires_action":
                return self.event(state, command, "payment.requires_action", "requires_action")
            case "declined":
                return self.event(
                    state,
                    command,
                    "payment.declined",
                    "declined",
                    decline_code=result.decline_code,
                    reason=result.message,
                )
            case "unknown":
                state.pending = pending_attempt(state, command, "authorize", command.amount)
                return self.event(
                    state,
                    command,
                    "payment.pending_verification",
                    "pending_verification",
                    reason="PSP outcome unknown (timeout or lost response); verifying",
                )
            case _:  # not_sent, or still retryable after the inline retries
                return self.event(
                    state,
                    command,
                    "payment.failed",
                    "failed",
                    decline_code=result.decline_code,
                    reason=f"psp_{result.outcome}: {result.message or 'no detail'}",
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
        if result.outcome in TRANSIENT_OUTCOMES:
            raise RetryLater(
                f"capture psp_{result.outcome}: {result.message or 'no detail'}",
                result.decline_code,
            )
        if result.outcome == "succeeded":
            state.amount_captured += amount
            fee = fee_for(amount, self._fee_bps, self._fee_fixed)
            return self.event(
                state, command, "payment.captured", "captured",
                fee=fee, amount_captured_now=amount,
            )
        if result.outcome == "unknown":
            state.pending = pending_attempt(state, command, "capture", amount)
            return self.event(
                state,
                command,
                "payment.pending_verification",
                "pending_verification",
                reason="capture outcome unknown (timeout or lost response); verifying",
            )
        return self.event(
            state,
            command,
            "payment.failed",
            "authorized",
            decline_code=result.decline_code,
            reason=f"capture failed: psp_{result.outcome}: {result.message or 'no detail'}",
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
        reference = state.psp_reference

        def void(attempt: str) -> Awaitable[PspResult]:
            return adapter.void(
                VoidRequest(attempt_id=attempt, payment_id=state.payment_id,
                            psp_reference=reference)
            )

        result = await _single_call(void, attempt_id(state.payment_id, "void", 1))
        if result.outcome in TRANSIENT_OUTCOMES or result.outcome == "unknown":
            raise RetryLater(f"void psp_{result.outcome}: {result.message or 'no detail'}")
        if result.outcome == "succeeded":
            return self.event(state, envelope, "payment.canceled", "canceled", reason=reason)
        return self.event(
            state, envelope, "payment.failed", state_status(state),
            decline_code=result.decline_code,
            reason=f"void failed: psp_{result.outcome}: {result.message or 'no detail'}",
        )

    async def refund(self, state: PaymentState, command: RefundPayment) -> PaymentEvent | None:
        """Refund part or all of the captured amount; None while the PSP says pending."""
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
        reference = state.psp_reference

        def refund(attempt: str) -> Awaitable[PspResult]:
            return adapter.refund(
                RefundRequest(attempt_id=attempt, payment_id=state.payment_id,
                              psp_reference=reference, amount=amount)
            )

        # One attempt id per refund_id: a retried or re-executed refund command is the same
        # refund at the PSP, never a second one.
        result = await _single_call(
            refund, attempt_id(state.payment_id, "refund", command.refund_id)
        )
        if result.outcome in TRANSIENT_OUTCOMES or result.outcome == "unknown":
            raise RetryLater(f"refund psp_{result.outcome}: {result.message or 'no detail'}")
        if result.outcome == "succeeded" and result.status == "pending":
            state.pending_refunds[command.refund_id] = PendingRefund(
                refund_id=command.refund_id,
                refund_reference=result.refund_reference,
                amount=amount,
                command_id=command.command_id,
                idempotency_key=command.idempotency_key,
                command_created_at=command.created_at,
            )
            return None
        if result.outcome == "succeeded":
            return self._refunded(state, command, command.refund_id, amount)
        return self.event(
            state, command, "payment.refund_failed", state_status(state),
            refund_id=command.refund_id, decline_code=result.decline_code,
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
            if note.psp_reference is None:
                return None
            answer = ResolvePayment(
                payment_id=state.payment_id,
                attempt_id=state.pending.attempt_id,
                operation=state.pending.operation,
                psp=note.psp,
                found=True,
                status=note.status,
                psp_reference=note.psp_reference,
                amount_captured=note.amount if note.status == "succeeded" else 0,
            )
            if state.pending.operation == "capture" and note.status != "succeeded":
                return None  # only a success settles a pending capture by webhook
            return self.resolve(state, answer)
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
                fee = fee_for(state.amount, self._fee_bps, self._fee_fixed)
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

    # -- unknown outcomes ---------------------------------------------------------------
    def resolve(self, state: PaymentState, answer: ResolvePayment) -> PaymentEvent | None:
        """Apply the PSP's answer about a pending attempt; None when it is stale."""
        pending = state.pending
        if (
            state.status != "pending_verification"
            or pending is None
            or pending.attempt_id != answer.attempt_id
        ):
            return None  # already resolved, or an answer about another attempt
        envelope = CommandEnvelope(
            type="authorize_payment" if pending.operation == "authorize" else "capture_payment",
            schema_version=1,
            command_id=pending.command_id,
            merchant_id=state.merchant_id,
            idempotency_key=pending.idempotency_key,
            payment_id=state.payment_id,
            created_at=pending.command_created_at,
        )
        state.pending = None
        if answer.psp_reference:
            state.psp_reference = answer.psp_reference
        if pending.operation == "authorize":
            return self._resolve_authorize(state, envelope, answer, pending.amount)
        return self._resolve_capture(state, envelope, answer, pending.amount)

    def _resolve_authorize(
        self, state: PaymentState, envelope: CommandEnvelope, answer: ResolvePayment, amount: int
    ) -> PaymentEvent:
        if not answer.found:
            return self.event(
                state, envelope, "payment.failed", "failed",
                reason="the PSP has no record of the attempt: nothing was charged",
            )
        match answer.status:
            case "succeeded":
                state.amount_captured = amount
                fee = fee_for(amount, self._fee_bps, self._fee_fixed)
                return self.event(
                    state, envelope, "payment.captured", "captured",
                    fee=fee, amount_captured_now=amount,
                )
            case "requires_capture":
                state.authorized_at = datetime.now(UTC)
                return self.event(state, envelope, "payment.authorized", "authorized")
            case "requires_action":
                return self.event(state, envelope, "payment.requires_action", "requires_action")
            case "canceled":
                return self.event(state, envelope, "payment.canceled", "canceled")
            case _:
                return self.event(
                    state, envelope, "payment.declined", "declined",
                    decline_code=answer.decline_code, reason=answer.message,
                )

    def _resolve_capture(
        self, state: PaymentState, envelope: CommandEnvelope, answer: ResolvePayment, amount: int
    ) -> PaymentEvent:
        if answer.found and answer.amount_captured >= state.amount_captured + amount:
            state.amount_captured += amount
            fee = fee_for(amount, self._fee_bps, self._fee_fixed)
            return self.event(
                state, envelope, "payment.captured", "captured",
                fee=fee, amount_captured_now=amount,
            )
        return self.event(
            state, envelope, "payment.failed", "authorized",
            reason="the capture did not happen at the PSP; the authorization stands",
        )


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
    state: PaymentState, command: CommandEnvelope, operation: str, amount: int
) -> PendingAttempt:
    """The attempt just made (the last attempt id), to look up later."""
    return PendingAttempt(
        operation="authorize" if operation == "authorize" else "capture",
        attempt_id=attempt_id(state.payment_id, operation, state.attempts),
        amount=amount,
        command_id=command.command_id,
        idempotency_key=command.idempotency_key,
        command_created_at=command.created_at,
    )

