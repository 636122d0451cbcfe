"""The merchant-webhook dispatcher task (``deliver_merchant_webhooks``).

``apply_events`` enqueues deliveries in the webhook outbox (PostgreSQL) in the same
transaction as the ledger; this task sends the due ones until the worker stops
(``sinks.webhook_dispatcher``), dead deliveries to ``payments.webhooks.dlq``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from agents.context import AgentContext
from sinks.webhook_dispatcher import WebhookDispatcher, kafka_dead_letter
from topics.publisher import EventPublisher


class MerchantWebhookTask:
    """The ``deliver_merchant_webhooks`` task of every worker."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self._tasks: list[Any] = []

    def register(self) -> None:
        @self.ctx.app.task  # type: ignore[untyped-decorator]
        async def deliver_merchant_webhooks() -> None:
            await self.deliver_merchant_webhooks()

        self._tasks.append(deliver_merchant_webhooks)

    async def deliver_merchant_webhooks(self) -> None:
        """Send due webhook deliveries (the outbox in PostgreSQL) until the worker stops."""
        settings = self.ctx.settings
        pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=4)
        await self.ctx.resources.db()  # migrations applied
        publisher = EventPublisher(settings)
        dispatcher = WebhookDispatcher(
            pool, settings,
            kafka_dead_letter(publisher, consumer_group=f"{self.ctx.group}-webhooks"),
        )
        stop = asyncio.Event()
        try:
            await dispatcher.run_forever(stop)
        finally:
            await pool.close()
