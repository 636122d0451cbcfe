"""The command processor agent (``process_commands``): the only writer of each payment.

``process_commands`` (payments.commands, payments.internal, psp.notifications ->
payments.events) runs intake, idempotency, state checks and the PSP call, in batches from
``stream.take_events``. Payments of a batch run concurrently; the commands of one payment
run in order. The batch's outputs and new states are made durable by
:class:`agents.commit.BatchCommit` before Faust acks the batch.

The state machine and the PSP calls are in ``agents/processor.py`` and
``agents/executor.py`` (testable without Faust); this module feeds them from the topics:
parsing and grouping a batch, merchant idempotency keys, retries in the retry tiers,
notifications about payments not known yet, and verification requests for the resolver.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from agents.commit import BatchCommit
from agents.context import AgentContext
from agents.dead_letters import dead_letter, dead_letter_unexpected
from agents.events import build_event, rejection
from agents.executor import Executor, RetryLater
from agents.fees import FeeSchedule
from agents.forwarding import forward_if_misplaced
from agents.intake import Accepted, DeadLetter, Rejected, parse_command
from agents.processor import CommandProcessor
from agents.runtime import fail_stop, with_infra_retries
from agents.state import IdempotencyRecord, PaymentState
from observability import metrics
from psp.protocol import PspNotification
from schemas.dlq import DlqEnvelope, scrub_payload
from schemas.events import PaymentEvent
from schemas.internal import (
    INTERNAL_ADAPTER,
    Delayed,
    ExpireAuthorization,
    ResolvePayment,
    RetryCommand,
    RetryNotification,
    VerifyRequest,
)
from topics import catalog as cat
from topics.publisher import EventPublisher

log = logging.getLogger("paystream.agents")

WorkItem = Accepted | ResolvePayment | ExpireAuthorization | PspNotification


@dataclass(slots=True)
class Work:
    """One thing to apply to one payment, with the record it came from."""

    event: Any
    item: WorkItem
    attempt: int = 0
    """Retries already made (commands and notifications back from a retry tier)."""
    origin: RetryCommand | None = None


class CommandAgent:
    """``process_commands``: its batch loop and the steps of one batch."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._agents: list[Any] = []

    def register(self, commands_topic: Any) -> None:
        """Register the ``process_commands`` agent on ``commands_topic`` (co-partitioned)."""

        @self.ctx.app.agent(commands_topic, name="process_commands")
        async def process_commands(stream: Any) -> AsyncIterator[None]:
            await self.process_commands(stream)
            yield None  # pragma: no cover - makes this an async generator for Faust's typing

        self._agents.append(process_commands)

    async def process_commands(self, stream: Any) -> None:
        """Process batches until the stream ends; close the resources when it does."""
        settings = self.settings
        resources = self.ctx.resources
        publisher = EventPublisher(settings)
        committer = BatchCommit(
            settings, publisher, self.ctx.fencing, self.ctx.state_table, self.ctx.changelog
        )
        fees = FeeSchedule(settings.fee_bps, settings.fee_fixed_minor)
        processor = CommandProcessor(
            Executor(resources.psps(), settings.fee_bps, settings.fee_fixed_minor, fees)
        )
        fees_loaded_at = -settings.fee_refresh_seconds

        async def load_fees() -> None:
            await fees.refresh(await resources.db())

        try:
            async for batch in stream.take_events(
                settings.batch_max, within=settings.batch_within
            ):
                if time.monotonic() - fees_loaded_at >= settings.fee_refresh_seconds:
                    await with_infra_retries("loading merchant fees", load_fees)
                    fees_loaded_at = time.monotonic()
                metrics.BATCH_SIZE.labels("process_commands").observe(len(batch))
                try:
                    changes = await self.process_command_batch(batch, publisher, processor)
                except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                    fail_stop(f"unexpected error in process_commands: {exc!r}")
                # Flush outputs, fence, write and flush the state changelog; Faust acks
                # the batch when this loop asks for the next one (agents/commit.py).
                await committer.commit(changes)
        finally:
            await resources.close()

    async def process_command_batch(
        self, batch: Sequence[Any], publisher: EventPublisher, processor: CommandProcessor
    ) -> dict[bytes, tuple[int, bytes]]:
        """Process one batch; returns the payments' new states to write to the changelog."""
        per_payment: dict[bytes, list[Work]] = {}

        def add(event: Any, key: str, item: WorkItem, attempt: int = 0,
                origin: RetryCommand | None = None) -> None:
            per_payment.setdefault(key.encode(), []).append(Work(event, item, attempt, origin))

        for event in batch:
            try:
                topic = event.message.topic
                if topic == cat.PSP_NOTIFICATIONS:
                    note = PspNotification.model_validate_json(event.value)
                    add(event, note.payment_id or event.key.decode(), note)
                    continue
                if topic == cat.INTERNAL:
                    message = INTERNAL_ADAPTER.validate_json(event.value)
                    if isinstance(message, RetryCommand):
                        verdict = parse_command(message.command.encode())
                        if isinstance(verdict, Accepted):
                            add(event, message.payment_id, verdict, message.attempt, message)
                            continue
                        raise ValueError(f"retried command no longer parses: {verdict}")
                    if isinstance(message, RetryNotification):
                        note = PspNotification.model_validate_json(message.notification)
                        add(event, message.payment_id, note, message.attempt)
                        continue
                    add(event, message.payment_id, message)
                    continue
                if forward_if_misplaced(publisher, event, self.settings.partitions):
                    continue  # another partition owns this payment: sent there, one hop
                verdict = parse_command(event.value)
                if isinstance(verdict, DeadLetter):
                    metrics.COMMANDS.labels("unknown", "dlq").inc()
                    dead_letter(publisher, event, "intake", verdict.reason, verdict.error_type,
                                verdict.message, self.ctx.group)
                elif isinstance(verdict, Rejected):
                    reply = rejection(None, verdict.envelope, verdict.reason)
                    metrics.COMMANDS.labels(verdict.envelope.type, reply.type).inc()
                    self.publish_event(publisher, reply)
                else:
                    add(event, verdict.command.payment_id, verdict)
            except Exception as exc:  # noqa: BLE001 - never let one record ack silently
                dead_letter_unexpected(publisher, event, "intake", exc, self.ctx.group)

        await self.check_merchant_keys(per_payment, publisher)
        changes: dict[bytes, tuple[int, bytes]] = {}
        validity = timedelta(seconds=self.settings.authorization_validity_seconds)

        await asyncio.gather(*(
            self.run_payment(k, v, publisher, processor, changes, validity)
            for k, v in per_payment.items()
        ))
        return changes

    async def run_payment(
        self, key: bytes, items: list[Work], publisher: EventPublisher,
        processor: CommandProcessor, changes: dict[bytes, tuple[int, bytes]],
        validity: timedelta,
    ) -> None:
        """Apply one payment's work items in order; record its new state in ``changes``."""
        try:
            raw_state = self.ctx.state_table.data.get(key)
            state = PaymentState.model_validate_json(raw_state) if raw_state else None
        except Exception as exc:  # noqa: BLE001 - unreadable state: park its commands
            for work in items:
                dead_letter_unexpected(publisher, work.event, "state", exc, self.ctx.group)
            return
        for work in items:
            event, item = work.event, work.item
            kind: str
            try:
                working = state.model_copy(deep=True) if state is not None else None
                if isinstance(item, ResolvePayment):
                    if working is None:
                        self.park_resolution(publisher, event, item)
                        continue
                    new_state, outputs = processor.resolve(working, item)
                    kind = item.type
                elif isinstance(item, ExpireAuthorization):
                    try:
                        new_state, outputs = await processor.expire(working, item, validity)
                    except RetryLater as retry:  # the next sweep asks again
                        log.warning("expiry of %s postponed: %s", item.payment_id, retry)
                        continue
                    kind = item.type
                    if outputs and outputs[0].type == "payment.canceled":
                        metrics.AUTHORIZATIONS_EXPIRED.inc()
                elif isinstance(item, PspNotification):
                    if working is None:
                        self.park_notification(publisher, work, item)
                        continue
                    new_state, outputs = processor.notify(working, item)
                    kind = "psp_notification"
                else:
                    kind = item.command.type
                    idem = item.command.idempotency_key
                    if working is not None and idem in working.retrying:
                        # This command is parked in a retry tier: only its due retry
                        # runs it (a redelivered or repeated copy would race the retry
                        # chain and could give the payment a second outcome).
                        if work.origin is None or work.attempt < working.retrying[idem]:
                            log.info("%s %s: copy skipped, retry %d of it is parked "
                                     "(this copy: %s)", item.command.payment_id, idem,
                                     working.retrying[idem],
                                     work.attempt if work.origin else "original")
                            continue
                        # A "created" state carries the attempt counter: the retry
                        # is a fresh attempt (finding 8 of issue 11).
                        del working.retrying[idem]
                    try:
                        new_state, outputs = await processor.handle(working, item)
                    except RetryLater as retry:
                        new_state, outputs = self.retry_command(
                            publisher, work, item, state, retry
                        )
                for output in outputs:
                    metrics.COMMANDS.labels(kind, output.type).inc()
                    self.publish_event(publisher, output)
                if new_state is not None and new_state != state:
                    if new_state.pending is not None and (
                        state is None or state.pending != new_state.pending
                    ):
                        self.request_verification(publisher, new_state)
                    value = new_state.model_dump_json().encode()
                    self.ctx.state_table.data[key] = value
                    changes[key] = (event.message.partition, value)
                    state = new_state
            except Exception as exc:  # noqa: BLE001 - one payment must not stop others
                dead_letter_unexpected(publisher, event, "executor", exc, self.ctx.group)

    async def check_merchant_keys(
        self, per_payment: dict[bytes, list[Work]], publisher: EventPublisher
    ) -> None:
        """Drop (as idempotency conflicts) commands whose key belongs to another payment."""
        accepted = [
            (key, work) for key, items in per_payment.items() for work in items
            if isinstance(work.item, Accepted)
        ]
        if not accepted:
            return
        requests = []
        for _key, work in accepted:
            command = work.item.command  # type: ignore[union-attr]
            requests.append((command.merchant_id, command.idempotency_key, command.payment_id))
        owners: list[str] = []

        async def bind() -> None:
            keys = await self.ctx.resources.idempotency_keys()
            owners[:] = await keys.bind(requests)

        await with_infra_retries("binding idempotency keys", bind)
        for (key, work), (_m, _k, payment_id), owner in zip(
            accepted, requests, owners, strict=True
        ):
            if owner == payment_id:
                continue
            command = work.item.command  # type: ignore[union-attr]
            reply = rejection(
                None, command,
                f"idempotency_conflict: this idempotency_key was already used for payment "
                f"{owner}",
            )
            metrics.COMMANDS.labels(command.type, reply.type).inc()
            self.publish_event(publisher, reply)
            per_payment[key].remove(work)

    def park(self, publisher: EventPublisher, attempt: int, key: str, value: str,
             kind: Any) -> None:
        """Send ``value`` (an internal message) to retry tier ``attempt`` (1-based)."""
        tiers_ = cat.retry_tiers(self.settings)
        topic, cap = tiers_[min(attempt, len(tiers_)) - 1]
        wait = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
        parked = Delayed(
            due_at=datetime.now(UTC) + timedelta(seconds=wait),
            target_topic=cat.INTERNAL, key=key, value=value, kind=kind,
        )
        metrics.RETRIES.labels(topic.rsplit(".", 1)[-1], kind).inc()
        publisher.publish(topic, key.encode(), parked.model_dump_json().encode())

    def retry_command(
        self, publisher: EventPublisher, work: Work, accepted: Accepted, state: PaymentState | None,
        retry: RetryLater,
    ) -> tuple[PaymentState, list[PaymentEvent]]:
        """A transient PSP failure: retry in a tier, or give up after the last attempt.

        Returns the state to keep: it records the parked retry (so only that retry runs the
        command), or, after the last attempt, the final failure in the command's
        idempotency record (exactly one outcome per command; a repeat replays it).
        """
        command = accepted.command
        origin = work.origin
        attempt = work.attempt + 1
        now = datetime.now(UTC)
        if state is None or state.status == "created":
            base = PaymentState(payment_id=command.payment_id, merchant_id=command.merchant_id)
            base.amount = int(getattr(command, "amount", 0) or 0)
            base.currency = getattr(command, "currency", None)
        else:
            base = state.model_copy(deep=True)
        base.attempts = max(base.attempts, retry.attempts)
        base.retrying.pop(command.idempotency_key, None)
        if attempt <= self.settings.retry_max_attempts:
            message = RetryCommand(
                payment_id=command.payment_id,
                attempt=attempt,
                command=(origin.command if origin else work.event.value.decode()),
                original_topic=origin.original_topic if origin else work.event.message.topic,
                original_partition=(
                    origin.original_partition if origin else work.event.message.partition
                ),
                original_offset=origin.original_offset if origin else work.event.message.offset,
                first_failure_at=origin.first_failure_at if origin else now,
            )
            self.park(publisher, attempt, command.payment_id, message.model_dump_json(), "command")
            log.info("%s %s: retry %d parked (%s)", command.payment_id,
                     command.idempotency_key, attempt, retry.reason[:200])
            base.retrying[command.idempotency_key] = attempt
            return base, []
        # Retries exhausted: the command's one outcome is a failure; the original command
        # goes to the DLQ for an operator (a replay of it answers the same failure).
        failed_type = "payment.refund_failed" if command.type == "refund_payment" else (
            "payment.failed")
        base.sequence += 1
        if base.status == "created":
            base.status = "failed"
        reply = build_event(
            base, command, failed_type, base.status,  # type: ignore[arg-type]
            decline_code=retry.decline_code,
            reason=f"retries_exhausted: {retry.reason}",
            refund_id=getattr(command, "refund_id", None),
        )
        base.commands[command.idempotency_key] = IdempotencyRecord(
            fingerprint=accepted.fingerprint, events=[reply.model_dump_json()]
        )
        original = origin.command.encode() if origin else work.event.value
        envelope = DlqEnvelope(
            stage="executor", reason="retries_exhausted", error_type="TransientPspFailure",
            error_message=retry.reason[:1000],
            original_topic=origin.original_topic if origin else work.event.message.topic,
            original_partition=(
                origin.original_partition if origin else work.event.message.partition
            ),
            original_offset=origin.original_offset if origin else work.event.message.offset,
            consumer_group=self.ctx.group, attempts=attempt,
            first_failure_at=origin.first_failure_at if origin else now, last_failure_at=now,
        )
        metrics.DLQ_RECORDS.labels("executor", "retries_exhausted").inc()
        publisher.publish(cat.COMMANDS_DLQ, command.payment_id.encode(), scrub_payload(original),
                          envelope.to_headers())
        return base, [reply]

    def park_resolution(
        self, publisher: EventPublisher, event: Any, answer: ResolvePayment
    ) -> None:
        """The PSP answered for a payment whose state is not here (yet).

        After a rebalance or a restart the command that creates the state may still be on
        its way (redelivered after the answer): the answer waits in the retry tiers and
        comes back; only after ``notification_max_attempts`` does it go to the DLQ (never
        dropped silently; replayable once the state is back).
        """
        attempt = answer.redeliveries + 1
        if attempt <= self.settings.notification_max_attempts:
            again = answer.model_copy(update={"redeliveries": attempt})
            self.park(publisher, attempt, answer.payment_id, again.model_dump_json(),
                      "resolution")
            return
        dead_letter(publisher, event, "resolver", "unknown_payment", "UnknownPayment",
                    f"no state for {answer.payment_id} after {attempt - 1} retries",
                    self.ctx.group)

    def park_notification(
        self, publisher: EventPublisher, work: Work, note: PspNotification
    ) -> None:
        """A webhook about a payment we do not know (yet): retry, then dead-letter."""
        attempt = work.attempt + 1
        key = note.payment_id or work.event.key.decode()
        # No payment id at all (disputes, payouts): waiting will not help; an operator
        # handles it from the DLQ. A payment id we do not know yet may be in flight.
        reason = "unknown_payment" if note.payment_id else "no_payment_id"
        if note.payment_id and attempt <= self.settings.notification_max_attempts:
            message = RetryNotification(
                payment_id=key, attempt=attempt, notification=note.model_dump_json()
            )
            self.park(publisher, attempt, key, message.model_dump_json(), "notification")
            return
        metrics.DLQ_RECORDS.labels("notification", reason).inc()
        now = datetime.now(UTC)
        envelope = DlqEnvelope(
            stage="notification", reason=reason, error_type="UnknownPayment",
            error_message=f"{note.type} {note.event_id}: no payment {key} after "
            f"{attempt - 1} retries",
            original_topic=cat.PSP_NOTIFICATIONS, original_partition=work.event.message.partition,
            original_offset=work.event.message.offset, consumer_group=self.ctx.group,
            attempts=attempt, first_failure_at=now, last_failure_at=now,
        )
        publisher.publish(cat.PSP_NOTIFICATIONS_DLQ, key.encode(),
                          note.model_dump_json().encode(), envelope.to_headers())

    def request_verification(
        self, publisher: EventPublisher, state: PaymentState, *, sweep: bool = False
    ) -> None:
        """Queue a lookup of the state's pending attempt in the first delay tier."""
        pending = state.pending
        if pending is None or state.psp is None:
            return
        first_tier, delay = self.ctx.verify_tiers[0]
        if sweep:
            delay = 0.0
        request = VerifyRequest(
            payment_id=state.payment_id,
            merchant_id=state.merchant_id,
            psp=state.psp,
            operation=pending.operation,
            attempt_id=pending.attempt_id,
            psp_reference=state.psp_reference,
            expected_captured=state.amount_captured + pending.amount,
            request=pending.request,
            sweep=sweep,
            due_at=datetime.now(UTC) + timedelta(seconds=delay),
        )
        publisher.publish(first_tier, state.payment_id.encode(),
                          request.model_dump_json().encode())

    def publish_event(self, publisher: EventPublisher, event: PaymentEvent) -> None:
        publisher.publish(cat.EVENTS, event.payment_id.encode(), event.model_dump_json().encode())
