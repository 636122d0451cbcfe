"""Idempotency keys survive a Redis flush, and a key reused after its retention charges a
new payment whose events are its own (issue 11, finding 3)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from agents.idempotency import MerchantIdempotencyKeys
from config.settings import Settings
from paystream.client import PaymentsClient
from schemas.events import derive_event_id
from sinks.migrations import migrate
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_pipeline import sandbox_charges, unique
from tests.conftest import async_wait_for


def test_event_ids_name_the_payment() -> None:
    first = derive_event_id("m_1", "pay_1", "key", "payment.captured")
    second = derive_event_id("m_1", "pay_2", "key", "payment.captured")
    assert first != second
    assert first == derive_event_id("m_1", "pay_1", "key", "payment.captured")


async def test_binding_is_durable_and_refreshed_by_its_own_payment(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)
        keys = MerchantIdempotencyKeys(pool, ttl_seconds=3_600)
        merchant = unique("m")
        assert await keys.bind([(merchant, "k1", "pay_a"), (merchant, "k1", "pay_b"),
                                (merchant, "k2", "pay_c")]) == ["pay_a", "pay_a", "pay_c"]
        assert await keys.bind([(merchant, "k1", "pay_z")]) == ["pay_a"]

        async def age(hours: int) -> None:
            async with pool.acquire() as conn:
                await conn.execute(
                    "UPDATE idempotency_keys SET bound_at = now() - make_interval(hours => $2)"
                    " WHERE merchant_id = $1 AND idempotency_key = 'k1'", merchant, hours,
                )

        # A payment still using its key (retried, verified) keeps it past the retention.
        await age(2)
        assert await keys.bind([(merchant, "k1", "pay_a")]) == ["pay_a"]
        assert await keys.bind([(merchant, "k1", "pay_z")]) == ["pay_a"]
        # Once the retention is over since its last use, the key is free (as at Stripe).
        await age(2)
        assert await keys.bind([(merchant, "k1", "pay_z")]) == ["pay_z"]
        assert await keys.bind([(merchant, "k1", "pay_a")]) == ["pay_z"]
    finally:
        await pool.close()


@pytest.mark.stack
async def test_a_key_reused_after_its_retention_charges_a_payment_the_books_see(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    merchant, first, second = unique("m"), unique("pay"), unique("pay")

    def of(payment: str) -> list[dict[str, Any]]:
        return [v for v in events.values() if v["payment_id"] == payment]

    client.authorize(merchant_id=merchant, payment_id=first, idempotency_key="order-1",
                     amount=1_040, currency="USD", payment_method="tok_visa")
    client.flush()
    events.until(lambda _r: of(first), timeout=30)
    # Within the retention, a flushed Redis still knows the key is taken.
    redis = aioredis.Redis.from_url(live.redis_url)
    try:
        # Everything paystream keeps in Redis is gone (as after a FLUSHDB).
        gone = [k async for k in redis.scan_iter(match=f"{live.app_id}:*")]
        if gone:
            await redis.delete(*gone)
        client.authorize(merchant_id=merchant, payment_id=second, idempotency_key="order-1",
                         amount=1_050, currency="USD", payment_method="tok_visa")
        client.flush()
        events.until(lambda _r: of(second), timeout=30)
        (conflict,) = of(second)
        assert conflict["type"] == "payment.rejected"
        assert conflict["reason"].startswith("idempotency_conflict"), conflict
        assert not [c for c in sandbox_charges(live) if c.get("payment_id") == second]
        # After the retention the key is free: the new payment is charged AND booked.
        conn = await asyncpg.connect(live.pg_dsn)
        try:
            await conn.execute(
                "UPDATE idempotency_keys SET bound_at = now() - interval '30 days' "
                "WHERE merchant_id = $1", merchant,
            )
            third = unique("pay")
            client.authorize(merchant_id=merchant, payment_id=third,
                             idempotency_key="order-1", amount=1_060, currency="USD",
                             payment_method="tok_visa")
            client.flush()
            events.until(lambda _r: of(third), timeout=30)
            (captured,) = of(third)
            assert captured["type"] == "payment.captured"
            assert captured["event_id"] != of(first)[0]["event_id"]

            async def booked() -> Any:
                return await conn.fetchval(
                    "SELECT captured FROM ledger_payments WHERE payment_id = $1", third
                )

            assert await async_wait_for(booked, within=30) == 1_060
        finally:
            await conn.close()
    finally:
        await redis.aclose()


async def test_an_answer_restarts_the_retention(pg_dsn: str) -> None:
    """The retention runs from the last answer the merchant saw, not from the first use:
    a payment answered after long retries keeps its key for a whole retention."""
    from agents.idempotency import touch

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)
        keys = MerchantIdempotencyKeys(pool, ttl_seconds=3_600)
        merchant = unique("m")
        assert await keys.bind([(merchant, "k", "pay_a")]) == ["pay_a"]
        async with pool.acquire() as conn:
            await conn.execute("UPDATE idempotency_keys SET bound_at = now() - interval "
                               "'2 hours' WHERE merchant_id = $1", merchant)
            await touch(conn, [(merchant, "k", "pay_a"), (merchant, "k", "pay_other")])
        assert await keys.bind([(merchant, "k", "pay_b")]) == ["pay_a"]
    finally:
        await pool.close()
