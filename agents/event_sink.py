"""The event sink (``apply_events``): payments.events -> PostgreSQL, one transaction a batch.

Each batch's ledger postings, the status read model and the merchant webhook outbox are
written in one database transaction; an event the ledger refuses, or one that cannot be
read, goes to ``payments.events.dlq``. Infrastructure errors that persist stop the worker
without acking the batch (``agents.runtime``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg

from agents import idempotency
from agents.context import AgentContext
from agents.dead_letters import dead_letter, dead_letter_unexpected
from agents.runtime import fail_stop, with_infra_retries
from observability import metrics
from schemas.events import PaymentEvent
from sinks import ledger, status
from sinks.ledger_events import check_postable, post_payment_events
from sinks.webhook_outbox import enqueue_deliveries
from topics.publisher import EventPublisher


class EventSink:
    """The ``apply_events`` agent."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._agents: list[Any] = []

    def register(self, events_topic: Any) -> None:
        @self.ctx.app.agent(events_topic, name="apply_events")
        async def apply_events(stream: Any) -> AsyncIterator[None]:
            await self.apply_events(stream)
            yield None  # pragma: no cover

        self._agents.append(apply_events)

    async def apply_events(self, stream: Any) -> None:
        settings = self.settings
        publisher = EventPublisher(settings)
        pool = await self.ctx.resources.db()
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
            try:
                await self.apply_event_batch(batch, publisher, pool)
            except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                fail_stop(f"unexpected error in apply_events: {exc!r}")

    async def apply_event_batch(
        self, batch: Sequence[Any], publisher: EventPublisher, pool: asyncpg.Pool
    ) -> None:
        group = self.ctx.group
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
                visible = await status.without_superseded_pending(conn, events)
                # The key's retention runs from the answer (agents/idempotency.py).
                await idempotency.touch(conn, [(e.merchant_id, e.idempotency_key, e.payment_id)
                                               for e in events if not e.replayed])
                await status.apply_events(conn, visible)
                # Merchant webhooks are enqueued in the same transaction: exactly once.
                await enqueue_deliveries(conn, visible)
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
