"""Property test: random capture batches keep the ledger consistent and exact."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.ledger import (
    CapturePosting,
    fee_revenue_account,
    merchant_wallet_account,
    post_captures,
    psp_clearing_account,
    totals_by_currency,
    verify,
)

CURRENCIES = ("USD", "JPY", "KWD")
T0 = datetime(2024, 5, 1, tzinfo=UTC)


@st.composite
def postings(draw: st.DrawFn) -> CapturePosting:
    amount = draw(st.one_of(st.integers(1, 1_000), st.integers(1, 10**12 - 1), st.just(10**12 - 1)))
    fee = draw(st.one_of(st.just(0), st.just(amount), st.integers(0, amount)))
    return CapturePosting(
        # a small id space so events repeat, within and across batches
        event_id=f"evt_{draw(st.integers(0, 40))}",
        payment_id=f"pay_{draw(st.integers(0, 1_000))}",
        merchant_id=draw(st.sampled_from(["m_1", "m_2", "m_3", "m:odd:id"])),
        amount=amount,
        fee=fee,
        currency=draw(st.sampled_from(CURRENCIES)),
        occurred_at=T0 + timedelta(seconds=draw(st.integers(0, 86_400))),
    )


batches = st.lists(st.lists(postings(), min_size=0, max_size=25), min_size=1, max_size=4)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches=batches)
async def test_random_batches_keep_the_ledger_exact(
    ledger_pool: asyncpg.Pool,
    ledger_reset: Callable[[asyncpg.Connection], Awaitable[None]],
    batches: list[list[CapturePosting]],
) -> None:
    async with ledger_pool.acquire() as conn:
        await ledger_reset(conn)
        distinct: dict[str, CapturePosting] = {}
        for batch in batches:
            new = {p.event_id for p in batch if p.event_id not in distinct}
            for p in batch:
                distinct.setdefault(p.event_id, p)
            assert await post_captures(conn, batch) == len(new)
        # replaying everything posts nothing
        assert await post_captures(conn, [p for b in batches for p in b]) == 0

        report = await verify(conn)
        assert report.ok, report.violations

        expected: dict[str, int] = defaultdict(int)
        captured: dict[str, int] = defaultdict(int)
        fees: dict[str, int] = defaultdict(int)
        for p in distinct.values():
            expected[psp_clearing_account(p.currency).code] += p.amount
            expected[merchant_wallet_account(p.merchant_id, p.currency).code] += p.merchant_net
            expected[fee_revenue_account(p.currency).code] += p.fee
            captured[p.currency] += p.amount
            fees[p.currency] += p.fee
        rows = await conn.fetch("SELECT code, balance FROM ledger_accounts")
        # (a repeated event id with another payload may leave empty accounts behind)
        actual = {r["code"]: r["balance"] for r in rows if r["balance"] != 0}
        assert actual == {code: value for code, value in expected.items() if value != 0}
        assert report.transactions == len(distinct)

        totals = await totals_by_currency(conn)
        # (a currency may appear with zeros: accounts created for a repeated event id)
        assert {c: t.captured for c, t in totals.items() if t.captures} == dict(captured)
        assert {c: t.fees for c, t in totals.items() if t.captures} == dict(fees)
        for t in totals.values():
            assert t.captured == t.fees + t.merchant_net == t.fees + t.merchant_wallets
            if t.captures:
                assert report.currencies[t.currency].debits == t.captured
