"""Fees per merchant and currency, in the currency's own minor units (issue 11, finding 9)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from agents.fees import FeeSchedule, FeeTerms
from config.settings import Settings
from paystream.client import PaymentsClient
from sinks import ledger
from sinks.migrations import migrate
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_pipeline import unique


def test_default_fixed_fee_is_per_currency() -> None:
    fees = FeeSchedule(290, 30)
    assert fees.fee("m", "USD", 10_000) == 290 + 30  # $0.30
    assert fees.fee("m", "JPY", 10_000) == 290 + 30  # ¥30
    assert fees.fee("m", "KWD", 10_000) == 290 + 100  # 0.100 KWD, not 0.030
    assert fees.default_fixed("CLP") == 0  # exponent 0, unlisted: 30 cents scaled down
    assert fees.default_fixed("TND") == 300  # exponent 3, unlisted: scaled up
    fees.set_terms("m_vip", "USD", FeeTerms(100, 10))
    assert fees.fee("m_vip", "USD", 10_000) == 110
    assert fees.fee("m_vip", "EUR", 10_000) == 290 + 25  # no EUR terms: the default
    with pytest.raises(ValueError):
        fees.fee("m", None, 100)


async def test_schedule_reads_the_merchant_fees_table(pg_dsn: str) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)
        merchant = unique("m")
        async with pool.acquire() as conn:
            await ledger.set_merchant_fee(conn, merchant, "GBP", ledger.FeeTerms(150, 5))
        fees = FeeSchedule(290, 30)
        assert await fees.refresh(pool) >= 1
        assert fees.fee(merchant, "GBP", 10_000) == 150 + 5
    finally:
        await pool.close()


@pytest.mark.stack
async def test_pipeline_charges_the_merchants_own_terms(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    merchant = unique("m")
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        await ledger.set_merchant_fee(conn, merchant, "USD", ledger.FeeTerms(100, 7))
    finally:
        await conn.close()

    def captured(payment: str) -> dict[str, Any] | None:
        found = [v for v in events.values() if v["payment_id"] == payment]
        return found[0] if found else None

    # The workers reload fee terms every fee_refresh_seconds: payments sent before the
    # reload pay the default; wait until one pays the merchant's terms.
    fees: list[int] = []

    def pays_own_terms(_records: object) -> bool:
        payment = unique("pay")
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key=payment,
                         amount=10_000, currency="USD", payment_method="tok_visa")
        client.flush()
        event = events.until(lambda _r: captured(payment), timeout=30)
        fees.append(event["fee"])
        return bool(event["fee"] == 100 + 7)

    events.until(pays_own_terms, timeout=60)
    kwd = unique("pay")
    client.authorize(merchant_id=unique("m"), payment_id=kwd, idempotency_key="a",
                     amount=10_000, currency="KWD", payment_method="tok_visa")
    client.flush()
    event = events.until(lambda _r: captured(kwd), timeout=30)
    assert event["fee"] == 290 + 100, event  # 0.100 KWD default, not 30 fils
