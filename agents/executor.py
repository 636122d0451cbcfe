"""Executor: call the PSP for one command and turn its answer into payment events.

Every PSP call carries a deterministic attempt id as the PSP's idempotency key, so
re-running a command after a crash or redelivery replays the PSP's first answer instead
of charging again. A timeout or lost response is UNKNOWN, never a failure: the payment
goes to ``pending_verification`` until the PSP's status resolves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from agents.events import build_event, rejection
from agents.state import PaymentState, PendingAttempt, TransitionError, check_capture
from psp.protocol import AuthorizeRequest, CaptureRequest, PspResult
from psp.routing import NO_ROUTE_CODE, Router, is_rate_limited
from schemas.commands import AuthorizePayment, CapturePayment, CommandEnvelope
from schemas.events import EventType, PaymentEvent, PaymentStatus
from schemas.internal import ResolvePayment
from schemas.money import fee_for

RETRY_DELAYS_SECONDS = (0.05, 0.2)
"""Inline retries of a retryable PSP answer (same attempt id, so safe)."""


def attempt_id(payment_id: str, operation: str, number: int) -> str:
    """Our id for one PSP call; also the PSP idempotency key."""
    return f"att_{payment_id}_{operation}_{number}"


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

