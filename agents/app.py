"""The Faust application: topics, the payment-state table, agents and web views.

Two agents keep the money path to two Kafka hops:

* ``process_commands`` (payments.commands -> payments.events): intake, idempotency, state
  checks and the PSP call, in batches from ``stream.take_events``. Payments of a batch run
  concurrently; the commands of one payment run in order.
* ``apply_events`` (payments.events -> PostgreSQL): ledger postings and the status read
  model, one database transaction per batch.

Faust acks a batch when the agent asks for the next one, even if the body raised, so both
bodies catch per-record errors (to the DLQ) and treat infrastructure errors (broker or
database unreachable after retries) by stopping the process without acking: the batch is
then redelivered to the next worker (at-least-once; effects are idempotent).
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

import asyncpg
import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.commit import BatchCommit
from agents.context import AgentContext, raw_topic
from agents.dead_letters import dead_letter, dead_letter_unexpected
from agents.events import build_event, rejection
from agents.executor import Executor, RetryLater, is_positive_answer
from agents.fees import FeeSchedule
from agents.fencing import FenceSignals
from agents.forwarding import forward_if_misplaced
from agents.intake import Accepted, DeadLetter, Rejected, parse_command
from agents.monitors import BreakerStateMonitor, LagMonitor, LedgerImbalanceMonitor
from agents.processor import CommandProcessor
from agents.psp_ingress import PspWebhookIngress
from agents.resolver import ask_psp
from agents.resources import Resources
from agents.runtime import fail_stop, faust_credentials, with_infra_retries
from agents.state import IdempotencyRecord, PaymentState
from config.settings import Settings
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
from schemas.signatures import PSP_SIGNATURE_HEADER as SIGNATURE_HEADER
from sinks import ledger, status
from sinks.ledger_events import check_postable, post_payment_events
from sinks.webhook_dispatcher import WebhookDispatcher, kafka_dead_letter
from sinks.webhook_outbox import enqueue_deliveries
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


def create_app(settings: Settings) -> faust.App:
    settings.require_real()
    faust_dir = settings.data_dir / "faust"  # Faust's own files, out of the checkout
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings),
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_session_timeout=settings.broker_session_timeout,
        broker_rebalance_timeout=settings.broker_rebalance_timeout,
        broker_heartbeat_interval=settings.broker_heartbeat_interval,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        web_port=settings.web_port,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_in_thread=False,
        datadir=str(faust_dir / settings.app_id),
        stream_wait_empty=False,
    )
    group = settings.app_id
    tiers = cat.verify_tiers(settings)
    resources = Resources(settings)

    commands_topic = app.topic(
        cat.COMMANDS,
        # Co-partitioned, keyed by payment_id: PSP lookups, retries, expiries and PSP
        # webhooks all reach the payment's only writer.
        cat.INTERNAL,
        cat.PSP_NOTIFICATIONS,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
    )
    events_topic = raw_topic(app, settings, cat.EVENTS)
    changelog = cat.changelog_topic(settings.app_id, cat.PAYMENT_STATE_TABLE)
    state_table = app.Table(
        cat.PAYMENT_STATE_TABLE,
        default=None,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.partitions,
        changelog_topic=raw_topic(app, settings, changelog),
    )

    ctx = AgentContext(
        settings=settings,
        app=app,
        resources=resources,
        fencing=FenceSignals(resources, settings.app_id),
        state_table=state_table,
        verify_tiers=tiers,
        group=group,
        changelog=changelog,
    )
    ctx.fencing.register(app)

    # ---------------------------------------------------------------- command processing
    @app.agent(commands_topic, name="process_commands")
    async def process_commands(stream: Any) -> AsyncIterator[None]:
        publisher = EventPublisher(settings)
        committer = BatchCommit(settings, publisher, ctx.fencing, state_table, changelog)
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
                    changes = await process_command_batch(batch, publisher, processor)
                except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                    fail_stop(f"unexpected error in process_commands: {exc!r}")
                # Flush outputs, fence, write and flush the state changelog; Faust acks
                # the batch when this loop asks for the next one (agents/commit.py).
                await committer.commit(changes)
        finally:
            await resources.close()
        yield None  # pragma: no cover - makes this an async generator for Faust's typing

    async def process_command_batch(
        batch: Sequence[Any], publisher: EventPublisher, processor: CommandProcessor
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
                if forward_if_misplaced(publisher, event, settings.partitions):
                    continue  # another partition owns this payment: sent there, one hop
                verdict = parse_command(event.value)
                if isinstance(verdict, DeadLetter):
                    metrics.COMMANDS.labels("unknown", "dlq").inc()
                    dead_letter(publisher, event, "intake", verdict.reason, verdict.error_type,
                                verdict.message, group)
                elif isinstance(verdict, Rejected):
                    reply = rejection(None, verdict.envelope, verdict.reason)
                    metrics.COMMANDS.labels(verdict.envelope.type, reply.type).inc()
                    publish_event(publisher, reply)
                else:
                    add(event, verdict.command.payment_id, verdict)
            except Exception as exc:  # noqa: BLE001 - never let one record ack silently
                dead_letter_unexpected(publisher, event, "intake", exc, group)

        await check_merchant_keys(per_payment, publisher)
        changes: dict[bytes, tuple[int, bytes]] = {}
        validity = timedelta(seconds=settings.authorization_validity_seconds)

        async def run_payment(key: bytes, items: list[Work]) -> None:
            try:
                raw_state = state_table.data.get(key)
                state = PaymentState.model_validate_json(raw_state) if raw_state else None
            except Exception as exc:  # noqa: BLE001 - unreadable state: park its commands
                for work in items:
                    dead_letter_unexpected(publisher, work.event, "state", exc, group)
                return
            for work in items:
                event, item = work.event, work.item
                kind: str
                try:
                    working = state.model_copy(deep=True) if state is not None else None
                    if isinstance(item, ResolvePayment):
                        if working is None:
                            # The PSP answered for a payment this table does not know: the
                            # state was lost. Never drop that silently; park it for replay.
                            dead_letter(publisher, event, "resolver", "unknown_payment",
                                        "UnknownPayment", f"no state for {item.payment_id}", group)
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
                            park_notification(publisher, work, item)
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
                                continue
                            # A "created" state carries the attempt counter: the retry
                            # is a fresh attempt (finding 8 of issue 11).
                            del working.retrying[idem]
                        try:
                            new_state, outputs = await processor.handle(working, item)
                        except RetryLater as retry:
                            new_state, outputs = retry_command(
                                publisher, work, item, state, retry
                            )
                    for output in outputs:
                        metrics.COMMANDS.labels(kind, output.type).inc()
                        publish_event(publisher, output)
                    if new_state is not None and new_state != state:
                        if new_state.pending is not None and (
                            state is None or state.pending != new_state.pending
                        ):
                            request_verification(publisher, new_state)
                        value = new_state.model_dump_json().encode()
                        state_table.data[key] = value
                        changes[key] = (event.message.partition, value)
                        state = new_state
                except Exception as exc:  # noqa: BLE001 - one payment must not stop others
                    dead_letter_unexpected(publisher, event, "executor", exc, group)

        await asyncio.gather(*(run_payment(k, v) for k, v in per_payment.items()))
        return changes

    async def check_merchant_keys(
        per_payment: dict[bytes, list[Work]], publisher: EventPublisher
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
            keys = await resources.idempotency_keys()
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
            publish_event(publisher, reply)
            per_payment[key].remove(work)

    def park(publisher: EventPublisher, attempt: int, key: str, value: str,
             kind: Any) -> None:
        """Send ``value`` (an internal message) to retry tier ``attempt`` (1-based)."""
        tiers_ = cat.retry_tiers(settings)
        topic, cap = tiers_[min(attempt, len(tiers_)) - 1]
        wait = random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography
        parked = Delayed(
            due_at=datetime.now(UTC) + timedelta(seconds=wait),
            target_topic=cat.INTERNAL, key=key, value=value, kind=kind,
        )
        metrics.RETRIES.labels(topic.rsplit(".", 1)[-1], kind).inc()
        publisher.publish(topic, key.encode(), parked.model_dump_json().encode())

    def retry_command(
        publisher: EventPublisher, work: Work, accepted: Accepted, state: PaymentState | None,
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
        if attempt <= settings.retry_max_attempts:
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
            park(publisher, attempt, command.payment_id, message.model_dump_json(), "command")
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
            consumer_group=group, attempts=attempt,
            first_failure_at=origin.first_failure_at if origin else now, last_failure_at=now,
        )
        metrics.DLQ_RECORDS.labels("executor", "retries_exhausted").inc()
        publisher.publish(cat.COMMANDS_DLQ, command.payment_id.encode(), scrub_payload(original),
                          envelope.to_headers())
        return base, [reply]

    def park_notification(publisher: EventPublisher, work: Work, note: PspNotification) -> None:
        """A webhook about a payment we do not know (yet): retry, then dead-letter."""
        attempt = work.attempt + 1
        key = note.payment_id or work.event.key.decode()
        # No payment id at all (disputes, payouts): waiting will not help; an operator
        # handles it from the DLQ. A payment id we do not know yet may be in flight.
        reason = "unknown_payment" if note.payment_id else "no_payment_id"
        if note.payment_id and attempt <= settings.notification_max_attempts:
            message = RetryNotification(
                payment_id=key, attempt=attempt, notification=note.model_dump_json()
            )
            park(publisher, attempt, key, message.model_dump_json(), "notification")
            return
        metrics.DLQ_RECORDS.labels("notification", reason).inc()
        now = datetime.now(UTC)
        envelope = DlqEnvelope(
            stage="notification", reason=reason, error_type="UnknownPayment",
            error_message=f"{note.type} {note.event_id}: no payment {key} after "
            f"{attempt - 1} retries",
            original_topic=cat.PSP_NOTIFICATIONS, original_partition=work.event.message.partition,
            original_offset=work.event.message.offset, consumer_group=group,
            attempts=attempt, first_failure_at=now, last_failure_at=now,
        )
        publisher.publish(cat.PSP_NOTIFICATIONS_DLQ, key.encode(),
                          note.model_dump_json().encode(), envelope.to_headers())

    def request_verification(
        publisher: EventPublisher, state: PaymentState, *, sweep: bool = False
    ) -> None:
        """Queue a lookup of the state's pending attempt in the first delay tier."""
        pending = state.pending
        if pending is None or state.psp is None:
            return
        first_tier, delay = tiers[0]
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

    def publish_event(publisher: EventPublisher, event: PaymentEvent) -> None:
        publisher.publish(cat.EVENTS, event.payment_id.encode(), event.model_dump_json().encode())

    # ---------------------------------------------------------------- unknown outcomes
    def make_resolver(tier: int, topic_name: str, delay: float) -> None:
        @app.agent(ctx.raw_topic(topic_name), name=f"resolve_unknown_tier{tier + 1}")
        async def resolve_unknown(stream: Any) -> AsyncIterator[None]:
            publisher = EventPublisher(settings)
            async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
                try:
                    await resolve_batch(tier, delay, batch, publisher)
                except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                    fail_stop(f"unexpected error in resolver {topic_name}: {exc!r}")
                await with_infra_retries("publishing lookups", publisher.flush)
            yield None  # pragma: no cover

    async def resolve_batch(
        tier: int, delay: float, batch: Sequence[Any], publisher: EventPublisher
    ) -> None:
        requests: list[tuple[Any, VerifyRequest]] = []
        for event in batch:
            try:
                requests.append((event, VerifyRequest.model_validate_json(event.value)))
            except Exception as exc:  # noqa: BLE001 - unreadable request -> DLQ
                dead_letter_unexpected(publisher, event, "resolver", exc, group)
        if not requests:
            return
        # A tier has one delay, so its records are due in arrival order: wait for the last.
        wait = (max(r.due_at for _, r in requests) - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, delay))
        router = resources.psps()

        async def look_up(event: Any, request: VerifyRequest) -> None:
            try:
                result = await ask_psp(router.adapter(request.psp), request)
                lookups = request.lookups + 1
                metrics.VERIFY_LOOKUPS.labels(request.psp, result.outcome).inc()
                if is_positive_answer(request.operation, result):
                    answer = ResolvePayment(
                        payment_id=request.payment_id, attempt_id=request.attempt_id,
                        operation=request.operation, psp=request.psp,
                        result=result.model_dump_json(),
                        source="resend" if request.request is not None else "lookup",
                    )
                    publisher.publish(cat.INTERNAL, request.payment_id.encode(),
                                      answer.model_dump_json().encode())
                    return
                if request.sweep:
                    return  # the next stuck-payment sweep asks again
                if lookups >= settings.verify_max_lookups:
                    # No answer from the PSP after every tier: the payment stays pending
                    # (never declined or failed by us); the stuck-payment sweep asks again
                    # later, and the dead letter tells an operator.
                    dead_letter(publisher, event, "resolver", "unresolved", "Unresolved",
                                result.message or f"PSP lookups kept failing ({result.outcome})",
                                group)
                    return
                next_topic, next_delay = tiers[min(tier + 1, len(tiers) - 1)]
                retry = request.model_copy(update={
                    "lookups": lookups,
                    "due_at": datetime.now(UTC) + timedelta(seconds=next_delay),
                })
                publisher.publish(next_topic, event.key, retry.model_dump_json().encode())
            except Exception as exc:  # noqa: BLE001 - one lookup must not stop the others
                dead_letter_unexpected(publisher, event, "resolver", exc, group)

        await asyncio.gather(*(look_up(event, request) for event, request in requests))

    for tier_index, (tier_topic, tier_delay) in enumerate(tiers):
        make_resolver(tier_index, tier_topic, tier_delay)

    # ---------------------------------------------------------------- retry tiers
    def make_retry_tier(topic_name: str, cap: float) -> None:
        @app.agent(ctx.raw_topic(topic_name), name=f"retry_{topic_name.rsplit('.', 1)[-1]}")
        async def release_when_due(stream: Any) -> AsyncIterator[None]:
            publisher = EventPublisher(settings)
            async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
                try:
                    await release_batch(cap, batch, publisher)
                except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                    fail_stop(f"unexpected error in retry tier {topic_name}: {exc!r}")
                await with_infra_retries("releasing retries", publisher.flush)
            yield None  # pragma: no cover

    async def release_batch(cap: float, batch: Sequence[Any], publisher: EventPublisher) -> None:
        """Hold the batch until each record is due, then send it back to its target.

        A tier has one maximum delay and records arrive in the order they were parked, so
        waiting here delays nothing that is due sooner by more than the tier's delay; other
        payments' records on the source partitions never wait behind a retry.
        """
        parked: list[Delayed] = []
        for event in batch:
            try:
                parked.append(Delayed.model_validate_json(event.value))
            except Exception as exc:  # noqa: BLE001 - unreadable record -> DLQ
                dead_letter_unexpected(publisher, event, "retry", exc, group)
        for item in sorted(parked, key=lambda d: d.due_at):
            wait = (item.due_at - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, cap))
            publisher.publish(item.target_topic, item.key.encode(), item.value.encode())

    for retry_topic, retry_cap in cat.retry_tiers(settings):
        make_retry_tier(retry_topic, retry_cap)

    # ---------------------------------------------------------------- expiry sweep
    @app.timer(settings.expiry_sweep_interval_seconds)  # type: ignore[untyped-decorator]
    async def sweep_expired_authorizations() -> None:
        """Ask the payment's writer to void authorizations older than their validity.

        Every worker scans the states it holds; the writer re-checks, so a standby's or a
        second worker's request is a no-op.
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.authorization_validity_seconds)
        requests: list[tuple[bytes, ExpireAuthorization]] = []
        for key, raw in list(state_table.data.items()):
            if b'"status":"authorized"' not in raw:
                continue
            try:
                state = PaymentState.model_validate_json(raw)
            except Exception:  # noqa: BLE001, S112 - unreadable states are parked elsewhere
                continue
            if state.authorized_at is None or state.authorized_at > cutoff:
                continue
            requests.append((key, ExpireAuthorization(payment_id=state.payment_id,
                                                      requested_at=datetime.now(UTC))))
        if requests:
            log.info("expiry sweep: %d authorizations past their validity", len(requests))
            publisher = sweep_publisher()
            for key, request in requests:
                publisher.publish(cat.INTERNAL, key, request.model_dump_json().encode())
            await with_infra_retries("requesting expiries", publisher.flush)

    sweep_publishers: list[EventPublisher] = []

    @app.timer(settings.stuck_sweep_interval_seconds)  # type: ignore[untyped-decorator]
    async def sweep_stuck_payments() -> None:
        """Re-verify payments pending verification for longer than ``stuck_after_seconds``.

        Whatever lost a payment's verification (a resolver that gave up while the PSP was
        down, a resolution dead-lettered across a rebalance, a crash between steps), the
        payment's state still says it is pending: one lookup per sweep asks the PSP again
        until it answers. Every worker sweeps the states it holds; duplicates are harmless
        (a resolution applies once, to the attempt it names).
        """
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.stuck_after_seconds)
        stuck: list[PaymentState] = []
        for raw in list(state_table.data.values()):
            if b'"status":"pending_verification"' not in raw:
                continue
            try:
                state = PaymentState.model_validate_json(raw)
            except Exception:  # noqa: BLE001, S112 - unreadable states are parked elsewhere
                continue
            if state.pending is not None and (
                state.pending.since is None or state.pending.since < cutoff
            ):
                stuck.append(state)
        metrics.STUCK_PAYMENTS.set(len(stuck))
        if not stuck:
            return
        log.warning("stuck-payment sweep: %d payments pending verification for over %.0fs; "
                    "asking the PSPs again", len(stuck), settings.stuck_after_seconds)
        publisher = sweep_publisher()
        for state in stuck:
            request_verification(publisher, state, sweep=True)
        await with_infra_retries("requesting verification of stuck payments", publisher.flush)

    def sweep_publisher() -> EventPublisher:
        if not sweep_publishers:
            sweep_publishers.append(EventPublisher(settings))
        return sweep_publishers[0]

    monitors: list[Any] = []

    @app.timer(settings.lag_poll_interval_seconds)  # type: ignore[untyped-decorator]
    async def export_gauges() -> None:
        """Gauges for /metrics: pending verification, lag, breakers, ledger imbalance."""
        metrics.PENDING_VERIFICATION.set(
            sum(1 for raw in list(state_table.data.values())
                if b'"status":"pending_verification"' in raw)
        )
        if not monitors:
            monitors.extend([
                LagMonitor(settings),
                BreakerStateMonitor(
                    resources.redis_client(), [p.name for p in settings.psp_endpoints()],
                    settings.app_id, open_seconds=settings.psp_breaker_open_seconds,
                ),
                LedgerImbalanceMonitor(await resources.db()),
            ])
        for monitor in monitors:
            try:
                await monitor.poll_once()
            except Exception as exc:  # noqa: BLE001 - a gauge must not stop the worker
                log.warning("%s failed: %s: %s", type(monitor).__name__,
                            type(exc).__name__, exc)

    # ---------------------------------------------------------------- sinks
    @app.agent(events_topic, name="apply_events")
    async def apply_events(stream: Any) -> AsyncIterator[None]:
        publisher = EventPublisher(settings)
        pool = await resources.db()
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
            try:
                await apply_event_batch(batch, publisher, pool)
            except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                fail_stop(f"unexpected error in apply_events: {exc!r}")
        yield None  # pragma: no cover

    async def apply_event_batch(
        batch: Sequence[Any], publisher: EventPublisher, pool: asyncpg.Pool
    ) -> None:
        metrics.BATCH_SIZE.labels("apply_events").observe(len(batch))
        parsed: list[PaymentEvent] = []
        origin: dict[str, Any] = {}
        for event in batch:
            try:
                payment_event = PaymentEvent.model_validate_json(event.value)
                check_postable(payment_event)
                parsed.append(payment_event)
                origin.setdefault(payment_event.event_id, event)
            except Exception as exc:  # noqa: BLE001 - unusable event -> DLQ, not a crash loop
                dead_letter_unexpected(publisher, event, "sink", exc, group)

        rejected: list[ledger.Rejection] = []

        async def write(events: list[PaymentEvent] = parsed) -> None:
            async with pool.acquire() as conn, conn.transaction():
                posted, refused = await post_payment_events(conn, events)
                await status.apply_events(conn, events)
                # Merchant webhooks are enqueued in the same transaction: exactly once.
                await enqueue_deliveries(conn, events)
            rejected[:] = refused
            metrics.LEDGER_POSTINGS.labels("payment").inc(posted)

        await with_infra_retries("writing the ledger and status", write)
        for refusal in rejected:
            # The ledger refused what the state machine allowed: park it for a human.
            dead_letter(publisher, origin[refusal.event_id], "ledger", refusal.reason,
                        "LedgerRejection", refusal.detail, group)
        await with_infra_retries("publishing dead letters", publisher.flush)
        now = datetime.now(UTC)
        for e in parsed:
            metrics.EVENTS_APPLIED.labels(e.type).inc()
            if e.command_created_at is not None and not e.replayed:
                metrics.END_TO_END_LATENCY.observe(
                    max(0.0, (now - e.command_created_at).total_seconds())
                )

    # ---------------------------------------------------------------- merchant webhooks
    @app.task  # type: ignore[untyped-decorator]
    async def deliver_merchant_webhooks() -> None:
        """Send due webhook deliveries (the outbox in PostgreSQL) until the worker stops."""
        pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=4)
        await resources.db()  # migrations applied
        publisher = EventPublisher(settings)
        dispatcher = WebhookDispatcher(
            pool, settings, kafka_dead_letter(publisher, consumer_group=f"{group}-webhooks")
        )
        stop = asyncio.Event()
        try:
            await dispatcher.run_forever(stop)
        finally:
            await pool.close()

    # ---------------------------------------------------------------- web
    @app.page("/v1/payments/{payment_id}")
    class PaymentStatusView(faust.web.View):
        async def get(self, request: Any, payment_id: str) -> Any:
            pool = await resources.db()
            async with pool.acquire() as conn:
                found = await status.get_status(conn, payment_id)
            if found is None:
                return self.json({"error": "not_found", "payment_id": payment_id}, status=404)
            return self.json(found)

    ingress_parts: list[PspWebhookIngress] = []

    def psp_ingress() -> PspWebhookIngress:
        if not ingress_parts:
            adapters = {endpoint.name: resources.psps().adapter(endpoint.name)
                        for endpoint in settings.psp_endpoints()}
            ingress_parts.append(PspWebhookIngress(
                settings, adapters, resources.redis_client(), EventPublisher(settings)
            ))
        return ingress_parts[0]

    @app.page("/psp/{name}/webhooks")
    class PspWebhookView(faust.web.View):
        """PSP webhooks in: verified, deduplicated, on psp.notifications before the 2xx."""

        async def post(self, request: Any, name: str) -> Any:
            body = await request.read()
            code, answer = await psp_ingress().handle(
                name, body, request.headers.get(SIGNATURE_HEADER)
            )
            return self.json(answer, status=code)

    @app.page("/metrics")
    class MetricsView(faust.web.View):
        async def get(self, request: Any) -> Any:
            # aiohttp refuses a charset inside content_type; the exposition format is UTF-8.
            content_type = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"
            return self.bytes(generate_latest(), content_type=content_type)

    @app.page("/healthz")
    class HealthView(faust.web.View):
        async def get(self, request: Any) -> Any:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class ReadyView(faust.web.View):
        async def get(self, request: Any) -> Any:
            try:
                pool = await resources.db()
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
            except Exception as exc:  # noqa: BLE001 - readiness reports any failure
                return self.json({"status": "not_ready", "error": str(exc)}, status=503)
            if not app.rebalancing and app.consumer is not None:
                return self.json({"status": "ready"})
            return self.json({"status": "not_ready", "error": "rebalancing"}, status=503)

    return app

