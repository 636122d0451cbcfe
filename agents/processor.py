"""The command processor: idempotency, state checks and execution for one payment.

It is the logical intake + executor stage of SPEC.md's flow run in one agent, which saves
a Kafka hop on the money path. Commands of one payment are handled strictly in order.
"""

from __future__ import annotations

from agents.events import rejection
from agents.executor import Executor
from agents.intake import Accepted
from agents.state import IdempotencyRecord, PaymentState
from schemas.commands import AuthorizePayment, CapturePayment
from schemas.events import PaymentEvent
from schemas.internal import ResolvePayment


class CommandProcessor:
    """Applies accepted commands to payment state; returns (new state, events)."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def handle(
        self, state: PaymentState | None, accepted: Accepted
    ) -> tuple[PaymentState | None, list[PaymentEvent]]:
        command = accepted.command
        if state is not None:
            if state.merchant_id != command.merchant_id:
                # Do not reveal anything about another merchant's payment.
                return state, [rejection(None, command, "state_violation: unknown payment")]
            record = state.commands.get(command.idempotency_key)
            if record is not None:
                if record.fingerprint != accepted.fingerprint:
                    return state, [
                        rejection(
                            state,
                            command,
                            "idempotency_conflict: this idempotency_key was used with a "
                            "different payload",
                        )
                    ]
                replayed = [
                    PaymentEvent.model_validate_json(text).model_copy(update={"replayed": True})
                    for text in record.events
                ]
                return state, replayed

        if isinstance(command, AuthorizePayment):
            if state is not None:
                return state, [
                    rejection(state, command, "state_violation: payment_id already exists")
                ]
            state = PaymentState(payment_id=command.payment_id, merchant_id=command.merchant_id)
            event = await self._executor.authorize(state, command)
        elif isinstance(command, CapturePayment):
            if state is None:
                return None, [rejection(None, command, "state_violation: unknown payment")]
            event = await self._executor.capture(state, command)
            if event.type == "payment.rejected":
                return state, [event]
        else:
            return state, [
                rejection(state, command, f"unsupported: {command.type} is not supported yet")
            ]
        state.commands[command.idempotency_key] = IdempotencyRecord(
            fingerprint=accepted.fingerprint, events=[event.model_dump_json()]
        )
        return state, [event]

    def resolve(
        self, state: PaymentState | None, answer: ResolvePayment
    ) -> tuple[PaymentState | None, list[PaymentEvent]]:
        """Apply a PSP lookup's answer; stale or duplicate answers change nothing."""
        if state is None:
            return None, []
        event = self._executor.resolve(state, answer)
        return state, [event] if event is not None else []

