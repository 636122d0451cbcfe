"""The retry tiers (``retry_tierN``): hold parked records until due, then send them back.

The command processor parks a command (a transient PSP failure) or a notification (about
a payment not known yet) in ``payments.retry.tierN`` as a ``Delayed`` record with a
jittered due time (``CommandAgent.park``); the tier's agent sends it back to its target
topic (``payments.internal``) once it is due.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

from agents.context import AgentContext
from agents.dead_letters import dead_letter_unexpected
from agents.runtime import fail_stop, with_infra_retries
from schemas.internal import Delayed
from topics import catalog as cat
from topics.publisher import EventPublisher


class RetryTiers:
    """The ``retry_tierN`` agents."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._agents: list[Any] = []

    def register(self) -> None:
        """One agent per retry tier, named after its topic (``retry_tier1`` .. ``N``)."""
        for retry_topic, retry_cap in cat.retry_tiers(self.settings):
            self.make_retry_tier(retry_topic, retry_cap)

    def make_retry_tier(self, topic_name: str, cap: float) -> None:
        @self.ctx.app.agent(
            self.ctx.raw_topic(topic_name), name=f"retry_{topic_name.rsplit('.', 1)[-1]}"
        )
        async def release_when_due(stream: Any) -> AsyncIterator[None]:
            await self.release_when_due(topic_name, cap, stream)
            yield None  # pragma: no cover

        self._agents.append(release_when_due)

    async def release_when_due(self, topic_name: str, cap: float, stream: Any) -> None:
        settings = self.settings
        publisher = EventPublisher(settings)
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
            try:
                await self.release_batch(cap, batch, publisher)
            except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                fail_stop(f"unexpected error in retry tier {topic_name}: {exc!r}")
            await with_infra_retries("releasing retries", publisher.flush)

    async def release_batch(
        self, cap: float, batch: Sequence[Any], publisher: EventPublisher
    ) -> None:
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
                dead_letter_unexpected(publisher, event, "retry", exc, self.ctx.group)
        for item in sorted(parked, key=lambda d: d.due_at):
            wait = (item.due_at - datetime.now(UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(min(wait, cap))
            publisher.publish(item.target_topic, item.key.encode(), item.value.encode())
