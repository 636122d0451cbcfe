"""The command processor: idempotency, state checks and execution for one payment.

It is the logical intake + executor stage of SPEC.md's flow run in one agent, which saves
a Kafka hop on the money path. Commands of one payment are handled strictly in order.
Everything that changes a payment goes through here (commands, PSP lookups, PSP webhooks,
expiry), so the payment's partition has a single writer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agents.events import rejection
from agents.executor import EXPIRY_KEY, Executor, RetryLater
from agents.intake import Accepted
from agents.state import IdempotencyRecord, PaymentState
from psp.protocol import PspNotification
from schemas.commands import (
    AuthorizePayment,
    CapturePayment,
    CommandEnvelope,
    RefundPayment,
    VoidPayment,
)
from schemas.events import PaymentEvent
from schemas.internal import ExpireAuthorization, ResolvePayment

MAX_REMEMBERED_NOTIFICATIONS = 50
"""PSP event ids kept per payment for deduplication (webhooks are few per payment)."""

RESERVED_KEY_PREFIX = "paystream:"
"""Idempotency keys of paystream's own operations (an expiry's void) start with this;
a merchant's may not, so the two can never collide."""

__all__ = ["RESERVED_KEY_PREFIX", "CommandProcessor", "RetryLater"]


class CommandProcessor:
    """Applies accepted commands to payment state; returns (new state, events).

    ``handle`` raises :class:`RetryLater` on a transient PSP failure: the caller parks the
    command in a retry tier and keeps the state it had before the command.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def handle(
        self, state: PaymentState | None, accepted: Accepted
    ) -> tuple[PaymentState | None, list[PaymentEvent]]:
        command = accepted.command
        if command.idempotency_key.startswith(RESERVED_KEY_PREFIX):
            return state, [rejection(
                None, command,
                f"invalid_command: idempotency keys starting with {RESERVED_KEY_PREFIX!r} are "
                "reserved for paystream's own operations",
            )]
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

        event: PaymentEvent | None
        if isinstance(command, AuthorizePayment):
            # A "created" state with no parked retry is the due retry of this very command
            # (its attempt counter carries on, so a retry is a fresh attempt).
            if state is not None and (state.status != "created" or state.retrying):
                return state, [
                    rejection(state, command, "state_violation: payment_id already exists")
                ]
            if state is None:
                state = PaymentState(
                    payment_id=command.payment_id, merchant_id=command.merchant_id
                )
            event = await self._executor.authorize(state, command)
        elif state is None or state.status == "created":
            return state, [rejection(None, command, "state_violation: unknown payment")]
        elif isinstance(command, CapturePayment):
            event = await self._executor.capture(state, command)
        elif isinstance(command, VoidPayment):
            event = await self._executor.void(state, command)
        elif isinstance(command, RefundPayment):
            event = await self._executor.refund(state, command)
        else:
            return state, [
                rejection(state, command, f"unsupported: {command.type} is not supported yet")
            ]
        if event is not None and event.type == "payment.rejected":
            return state, [event]  # a refused command changes nothing and is not recorded
        state.commands[command.idempotency_key] = IdempotencyRecord(
            fingerprint=accepted.fingerprint,
            events=[event.model_dump_json()] if event is not None else [],
        )
        return state, [event] if event is not None else []

    def resolve(
        self, state: PaymentState | None, answer: ResolvePayment
    ) -> tuple[PaymentState | None, list[PaymentEvent]]:
        """Apply a PSP lookup's answer; stale or duplicate answers change nothing."""
        if state is None:
            return None, []
        event = self._executor.resolve(state, answer)
        if event is not None:
            self._remember(state, event)
        return state, [event] if event is not None else []

    def notify(
        self, state: PaymentState, note: PspNotification
    ) -> tuple[PaymentState, list[PaymentEvent]]:
        """Apply a verified PSP webhook; duplicates and stale ones change nothing."""
        if note.event_id in state.applied_notifications:
            return state, []
        event = self._executor.apply_notification(state, note)
        state.applied_notifications = [
            *state.applied_notifications[-(MAX_REMEMBERED_NOTIFICATIONS - 1):], note.event_id
        ]
        if event is not None:
            self._remember(state, event)
        return state, [event] if event is not None else []

    async def expire(
        self, state: PaymentState | None, request: ExpireAuthorization, validity: timedelta
    ) -> tuple[PaymentState | None, list[PaymentEvent]]:
        """Void the authorization if it is still uncaptured past ``validity``."""
        if (
            state is None
            or state.status != "authorized"
            or state.authorized_at is None
            or state.authorized_at + validity > datetime.now(UTC)
        ):
            return state, []
        envelope = CommandEnvelope(
            type="void_payment",
            schema_version=1,
            command_id=f"expiry_{state.payment_id}",
            merchant_id=state.merchant_id,
            idempotency_key=EXPIRY_KEY,
            payment_id=state.payment_id,
            created_at=request.requested_at,
        )
        event = await self._executor.void(state, envelope, reason="authorization_expired")
        if event.type == "payment.rejected":
            return state, []
        return state, [event]

    @staticmethod
    def _remember(state: PaymentState, event: PaymentEvent) -> None:
        """Add a late event to its command's idempotency record, so replays answer it."""
        record = state.commands.get(event.idempotency_key)
        if record is not None:
            state.commands[event.idempotency_key] = record.model_copy(
                update={"events": [*record.events, event.model_dump_json()]}
            )
