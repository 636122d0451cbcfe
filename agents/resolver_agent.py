"""The resolver tiers (``resolve_unknown_tierN``): settle unknown PSP outcomes.

One agent per verify tier (``payments.verify.tierN``, ``PAYSTREAM_VERIFY_DELAYS_SECONDS``):
each waits out its tier's delay, asks the PSP about the pending attempt
(:func:`agents.resolver.ask_psp`), and sends a positive answer back to the payment's only
writer on ``payments.internal``; anything else goes to the next tier, and after the last
lookup to the dead letters (the payment stays pending, see agents/resolver.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from agents.context import AgentContext
from agents.dead_letters import dead_letter, dead_letter_unexpected
from agents.executor import is_positive_answer
from agents.resolver import ask_psp
from agents.runtime import fail_stop, with_infra_retries
from observability import metrics
from psp.routing import Router
from schemas.internal import ResolvePayment, VerifyRequest
from topics import catalog as cat
from topics.publisher import EventPublisher


class ResolverTiers:
    """The ``resolve_unknown_tierN`` agents and the lookups of one batch."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self._agents: list[Any] = []

    def register(self) -> None:
        """One agent per verify tier, named ``resolve_unknown_tier1`` .. ``N``."""
        for tier_index, (tier_topic, tier_delay) in enumerate(self.ctx.verify_tiers):
            self.make_resolver(tier_index, tier_topic, tier_delay)

    def make_resolver(self, tier: int, topic_name: str, delay: float) -> None:
        @self.ctx.app.agent(
            self.ctx.raw_topic(topic_name), name=f"resolve_unknown_tier{tier + 1}"
        )
        async def resolve_unknown(stream: Any) -> AsyncIterator[None]:
            await self.resolve_unknown(tier, topic_name, delay, stream)
            yield None  # pragma: no cover

        self._agents.append(resolve_unknown)

    async def resolve_unknown(self, tier: int, topic_name: str, delay: float,
                              stream: Any) -> None:
        settings = self.settings
        publisher = EventPublisher(settings)
        async for batch in stream.take_events(settings.batch_max, within=settings.batch_within):
            try:
                await self.resolve_batch(tier, delay, batch, publisher)
            except Exception as exc:  # noqa: BLE001 - never let Faust ack this batch
                fail_stop(f"unexpected error in resolver {topic_name}: {exc!r}")
            await with_infra_retries("publishing lookups", publisher.flush)

    async def resolve_batch(
        self, tier: int, delay: float, batch: Sequence[Any], publisher: EventPublisher
    ) -> None:
        requests: list[tuple[Any, VerifyRequest]] = []
        for event in batch:
            try:
                requests.append((event, VerifyRequest.model_validate_json(event.value)))
            except Exception as exc:  # noqa: BLE001 - unreadable request -> DLQ
                dead_letter_unexpected(publisher, event, "resolver", exc, self.ctx.group)
        if not requests:
            return
        # A tier has one delay, so its records are due in arrival order: wait for the last.
        wait = (max(r.due_at for _, r in requests) - datetime.now(UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(wait, delay))
        router = self.ctx.resources.psps()
        await asyncio.gather(*(
            self.look_up(tier, router, publisher, event, request) for event, request in requests
        ))

    async def look_up(
        self, tier: int, router: Router, publisher: EventPublisher, event: Any,
        request: VerifyRequest,
    ) -> None:
        """Ask the PSP once; publish its answer, the next tier's request, or a dead letter."""
        tiers = self.ctx.verify_tiers
        group = self.ctx.group
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
            if lookups >= self.settings.verify_max_lookups:
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
