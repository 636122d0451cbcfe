"""Ledger postings against a real PostgreSQL: balances, idempotency, append-only, verify."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from pydantic import ValidationError

from schemas.money import fee_for
from sinks.ledger import (
    CapturePosting,
    fee_revenue_account,
    merchant_wallet_account,
    post_captures,
    psp_clearing_account,
    totals_by_currency,
    verify,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def capture(
    event_id: str,
    amount: int,
    fee: int,
    currency: str = "USD",
    merchant_id: str = "m_1",
    payment_id: str | None = None,
) -> CapturePosting:
    return CapturePosting(
        event_id=event_id,
        payment_id=payment_id or f"pay_{event_id}",
        merchant_id=merchant_id,
        amount=amount,
        fee=fee,
        currency=currency,
        occurred_at=T0,
    )


async def balance(conn: asyncpg.Connection, code: str) -> int:
    value = await conn.fetchval("SELECT balance FROM ledger_accounts WHERE code = $1", code)
    return 0 if value is None else int(value)


async def count(conn: asyncpg.Connection, table: str) -> int:
    assert table in {"ledger_transactions", "ledger_entries", "ledger_accounts"}
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608


# ----------------------------------------------------------------------------- model


def test_posting_validation() -> None:
    ok = capture("e1", 1000, 59)
    assert ok.merchant_net == 941
    with pytest.raises(ValidationError, match="exceeds amount"):
        capture("e1", 100, 101)
    with pytest.raises(ValidationError):
        capture("e1", 0, 0)
    with pytest.raises(ValidationError):
        capture("e1", 100, -1)
    with pytest.raises(ValidationError):
        capture("e1", 100, 0, currency="XXX")
    with pytest.raises(ValidationError):
        CapturePosting(
            event_id="e1",
            payment_id="p",
            merchant_id="m",
            amount=100,
            fee=0,
            currency="USD",
            occurred_at=datetime(2024, 1, 1),  # noqa: DTZ001 - naive on purpose
        )
    with pytest.raises(ValidationError):
        CapturePosting.model_validate(
            {
                "event_id": "e1",
                "payment_id": "p",
                "merchant_id": "m",
                "amount": 10.5,
                "fee": 0,
                "currency": "USD",
                "occurred_at": T0,
            }
        )


def test_account_codes() -> None:
    assert merchant_wallet_account("m_1", "USD").code == "merchant:m_1:available:USD"
    wallet = merchant_wallet_account("m_1", "USD")
    assert (wallet.kind, wallet.normal_balance, wallet.no_overdraft) == (
        "liability",
        "credit",
        True,
    )
    clearing = psp_clearing_account("JPY")
    assert (clearing.kind, clearing.normal_balance, clearing.currency) == ("asset", "debit", "JPY")
    revenue = fee_revenue_account("KWD")
    assert (revenue.kind, revenue.normal_balance) == ("revenue", "credit")
    with pytest.raises(ValueError):
        psp_clearing_account("usd")


# ----------------------------------------------------------------------------- posting


async def test_batch_posts_balanced_entries_and_balances(ledger_conn: asyncpg.Connection) -> None:
    batch = [
        capture("e1", 10_000, fee_for(10_000, 290, 30)),  # 320
        capture("e2", 2_500, 0),
        capture("e3", 500, 500),  # the fee takes it all
        capture("e4", 7_000, 203, currency="JPY", merchant_id="m_2"),
        capture("e5", 1_234, 37, currency="KWD"),
    ]
    assert await post_captures(ledger_conn, batch) == 5

    assert await balance(ledger_conn, "platform:psp_clearing:USD") == 13_000
    assert await balance(ledger_conn, "merchant:m_1:available:USD") == 9_680 + 2_500
    assert await balance(ledger_conn, "platform:fee_revenue:USD") == 320 + 500
    assert await balance(ledger_conn, "platform:psp_clearing:JPY") == 7_000
    assert await balance(ledger_conn, "merchant:m_2:available:JPY") == 6_797
    assert await balance(ledger_conn, "platform:fee_revenue:JPY") == 203
    assert await balance(ledger_conn, "merchant:m_1:available:KWD") == 1_197

    # zero legs are omitted: e2 has no fee entry, e3 no wallet entry
    assert await count(ledger_conn, "ledger_entries") == 3 + 2 + 2 + 3 + 3
    rows = await ledger_conn.fetch(
        """SELECT t.event_id, sum(e.amount) AS total, count(*) AS n
             FROM ledger_entries e JOIN ledger_transactions t ON t.id = e.transaction_id
            GROUP BY t.event_id"""
    )
    assert {r["event_id"]: int(r["total"]) for r in rows} == {f"e{i}": 0 for i in range(1, 6)}
    # sign convention: the clearing leg is a debit (positive), the others credits
    signs = await ledger_conn.fetch(
        """SELECT a.code, e.amount FROM ledger_entries e
             JOIN ledger_accounts a ON a.id = e.account_id
             JOIN ledger_transactions t ON t.id = e.transaction_id
            WHERE t.event_id = 'e1' ORDER BY e.id"""
    )
    assert [(r["code"], r["amount"]) for r in signs] == [
        ("platform:psp_clearing:USD", 10_000),
        ("merchant:m_1:available:USD", -9_680),
        ("platform:fee_revenue:USD", -320),
    ]
    tx = await ledger_conn.fetchrow(
        "SELECT kind, payment_id, merchant_id, occurred_at FROM ledger_transactions "
        "WHERE event_id = 'e4'"
    )
    assert tx is not None
    assert dict(tx) == {
        "kind": "capture",
        "payment_id": "pay_e4",
        "merchant_id": "m_2",
        "occurred_at": T0,
    }

    report = await verify(ledger_conn)
    assert report.ok, report.violations
    assert report.transactions == 5
    assert report.currencies["USD"].debits == report.currencies["USD"].credits == 13_000
    assert set(report.currencies) == {"USD", "JPY", "KWD"}

    totals = await totals_by_currency(ledger_conn)
    usd = totals["USD"]
    assert (usd.captures, usd.captured, usd.fees, usd.merchant_net, usd.merchant_wallets) == (
        3,
        13_000,
        820,
        12_180,
        12_180,
    )
    assert totals["JPY"].captured == 7_000 and totals["JPY"].fees == 203
    assert totals["KWD"].merchant_wallets == 1_197


async def test_empty_batch(ledger_conn: asyncpg.Connection) -> None:
    assert await post_captures(ledger_conn, []) == 0
    assert await count(ledger_conn, "ledger_accounts") == 0
    assert (await verify(ledger_conn)).ok
    assert await totals_by_currency(ledger_conn) == {}


async def test_reposting_a_batch_posts_nothing_new(ledger_conn: asyncpg.Connection) -> None:
    batch = [capture(f"e{i}", 1_000 + i, i) for i in range(20)]
    assert await post_captures(ledger_conn, batch) == 20
    entries = await count(ledger_conn, "ledger_entries")
    wallet = await balance(ledger_conn, "merchant:m_1:available:USD")

    assert await post_captures(ledger_conn, batch) == 0
    assert await post_captures(ledger_conn, list(reversed(batch[5:]))) == 0
    assert await count(ledger_conn, "ledger_entries") == entries
    assert await count(ledger_conn, "ledger_transactions") == 20
    assert await balance(ledger_conn, "merchant:m_1:available:USD") == wallet

    # a batch mixing old and new events posts only the new ones
    assert await post_captures(ledger_conn, [*batch[:3], capture("new", 50, 1)]) == 1
    assert await balance(ledger_conn, "merchant:m_1:available:USD") == wallet + 49
    assert (await verify(ledger_conn)).ok


async def test_duplicates_inside_one_batch_post_once(ledger_conn: asyncpg.Connection) -> None:
    first = capture("dup", 1_000, 30)
    batch = [first, capture("other", 200, 2), first, first.model_copy()]
    assert await post_captures(ledger_conn, batch) == 2
    assert await count(ledger_conn, "ledger_transactions") == 2
    assert await balance(ledger_conn, "merchant:m_1:available:USD") == 970 + 198
    assert await balance(ledger_conn, "platform:psp_clearing:USD") == 1_200
    assert (await verify(ledger_conn)).ok


async def test_posting_joins_the_callers_transaction(ledger_conn: asyncpg.Connection) -> None:
    tr = ledger_conn.transaction()
    await tr.start()
    assert await post_captures(ledger_conn, [capture("e1", 100, 1)]) == 1
    assert (await verify(ledger_conn)).ok
    await tr.rollback()
    assert await count(ledger_conn, "ledger_transactions") == 0


# ----------------------------------------------------------------------------- database rules


async def test_journal_is_append_only(ledger_conn: asyncpg.Connection) -> None:
    await post_captures(ledger_conn, [capture("e1", 1_000, 10)])
    refused = asyncpg.exceptions.RestrictViolationError
    for statement in (
        "UPDATE ledger_entries SET amount = amount + 1",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
        "UPDATE ledger_transactions SET kind = 'x'",
        "DELETE FROM ledger_transactions",
        "TRUNCATE ledger_transactions CASCADE",
    ):
        with pytest.raises(refused, match="append-only"):
            await ledger_conn.execute(statement)
    assert await count(ledger_conn, "ledger_entries") == 3
    assert (await verify(ledger_conn)).ok


async def test_unbalanced_or_mismatched_entries_are_refused(
    ledger_conn: asyncpg.Connection,
) -> None:
    await post_captures(ledger_conn, [capture("e1", 1_000, 10), capture("j1", 50, 0, "JPY")])
    tx_id = await ledger_conn.fetchval("SELECT id FROM ledger_transactions WHERE event_id='e1'")
    usd = await ledger_conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE code = 'platform:psp_clearing:USD'"
    )
    jpy = await ledger_conn.fetchval(
        "SELECT id FROM ledger_accounts WHERE code = 'platform:psp_clearing:JPY'"
    )
    insert = (
        "INSERT INTO ledger_entries (transaction_id, account_id, amount, currency) "
        "VALUES ($1, $2, $3, $4)"
    )
    with pytest.raises(asyncpg.exceptions.CheckViolationError, match="does not balance"):
        await ledger_conn.execute(insert, tx_id, usd, 5, "USD")
    with pytest.raises(asyncpg.exceptions.ForeignKeyViolationError):
        await ledger_conn.execute(insert, tx_id, jpy, 5, "USD")
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await ledger_conn.execute(insert, tx_id, usd, 0, "USD")
    with pytest.raises(asyncpg.exceptions.CheckViolationError, match="no_overdraft"):
        await ledger_conn.execute(
            "UPDATE ledger_accounts SET balance = -1 WHERE code = 'merchant:m_1:available:USD'"
        )
    assert (await verify(ledger_conn)).ok


# ----------------------------------------------------------------------------- verify


async def test_verify_reports_a_tampered_entry(ledger_conn: asyncpg.Connection) -> None:
    await post_captures(ledger_conn, [capture("e1", 1_000, 10), capture("e2", 300, 3)])
    assert (await verify(ledger_conn)).ok
    # as superuser only, inside a transaction we roll back (DDL is transactional)
    tr = ledger_conn.transaction()
    await tr.start()
    try:
        await ledger_conn.execute(
            "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_append_only"
        )
        await ledger_conn.execute(
            """UPDATE ledger_entries SET amount = amount - 7
                WHERE id = (SELECT min(e.id) FROM ledger_entries e
                              JOIN ledger_transactions t ON t.id = e.transaction_id
                             WHERE t.event_id = 'e2')"""
        )
        report = await verify(ledger_conn)
    finally:
        await tr.rollback()
    assert not report.ok
    kinds = {v.kind for v in report.violations}
    # (the tampered clearing entry no longer matches the payment's captured amount either)
    assert kinds == {
        "currency_imbalance",
        "transaction_imbalance",
        "balance_mismatch",
        "payment_mismatch",
    }
    imbalance = next(v for v in report.violations if v.kind == "transaction_imbalance")
    assert imbalance.event_id == "e2" and "-7" in imbalance.detail
    mismatch = next(v for v in report.violations if v.kind == "balance_mismatch")
    assert mismatch.account_code == "platform:psp_clearing:USD"
    assert report.currencies["USD"].debits == 1_293
    assert report.currencies["USD"].credits == 1_300
    assert (await verify(ledger_conn)).ok


async def test_verify_reports_tampered_balances_overdraft_and_currency(
    ledger_conn: asyncpg.Connection,
) -> None:
    await post_captures(ledger_conn, [capture("e1", 1_000, 10), capture("j1", 50, 0, "JPY")])
    tr = ledger_conn.transaction()
    await tr.start()
    try:
        await ledger_conn.execute(
            "ALTER TABLE ledger_accounts DROP CONSTRAINT ledger_accounts_no_overdraft"
        )
        await ledger_conn.execute(
            "UPDATE ledger_accounts SET balance = -5 WHERE code = 'merchant:m_1:available:USD'"
        )
        await ledger_conn.execute(
            "UPDATE ledger_accounts SET balance = balance + 1 "
            "WHERE code = 'platform:fee_revenue:USD'"
        )
        await ledger_conn.execute("ALTER TABLE ledger_entries DISABLE TRIGGER ALL")
        await ledger_conn.execute(
            """UPDATE ledger_entries SET currency = 'KWD'
                WHERE transaction_id = (SELECT id FROM ledger_transactions
                                         WHERE event_id = 'j1')"""
        )
        report = await verify(ledger_conn)
    finally:
        await tr.rollback()
    by_kind: dict[str, list[str]] = {}
    for violation in report.violations:
        by_kind.setdefault(violation.kind, []).append(violation.account_code or "")
    assert sorted(by_kind["balance_mismatch"]) == [
        "merchant:m_1:available:USD",
        "platform:fee_revenue:USD",
    ]
    assert by_kind["overdraft"] == ["merchant:m_1:available:USD"]
    assert sorted(by_kind["currency_mismatch"]) == [
        "merchant:m_1:available:JPY",
        "platform:psp_clearing:JPY",
    ]
    assert "currency_imbalance" not in by_kind  # KWD entries still sum to zero
    assert (await verify(ledger_conn)).ok


async def test_verify_reports_a_transaction_without_entries(
    ledger_conn: asyncpg.Connection,
) -> None:
    tr = ledger_conn.transaction()
    await tr.start()
    try:
        await ledger_conn.execute(
            "INSERT INTO ledger_transactions (event_id, kind, occurred_at) "
            "VALUES ('lonely', 'capture', now())"
        )
        report = await verify(ledger_conn)
    finally:
        await tr.rollback()
    assert [v.kind for v in report.violations] == ["transaction_without_entries"]


# ----------------------------------------------------------------------------- concurrency


async def test_concurrent_batches_on_a_hot_merchant(
    ledger_conn: asyncpg.Connection, ledger_pool: asyncpg.Pool
) -> None:
    """Four batches at once on four connections (``ledger_conn`` only empties the ledger)."""

    def batch(tag: str, n: int, shared: int) -> list[CapturePosting]:
        own = [
            capture(f"{tag}_{i}", 1_000 + i, fee_for(1_000 + i, 290, 30), merchant_id="m_hot")
            for i in range(n)
        ]
        # other merchants in opposite orders, and events both batches carry
        others = [
            capture(f"{tag}_o{i}", 500, 5, merchant_id=f"m_{i if tag == 'a' else 9 - i}")
            for i in range(10)
        ]
        common = [capture(f"common_{i}", 700, 7, merchant_id="m_hot") for i in range(shared)]
        return [*own, *others, *common]

    for round_no in range(3):
        batches = [batch(f"{tag}{round_no}", 200, 50) for tag in ("a", "b", "c", "d")]
        conns = [await ledger_pool.acquire() for _ in batches]
        try:
            posted = await asyncio.gather(
                *(post_captures(c, b) for c, b in zip(conns, batches, strict=True))
            )
        finally:
            for c in conns:
                await ledger_pool.release(c)
        # the 50 shared events post exactly once across the four batches (round 0 only)
        assert sum(posted) == 4 * 210 + (50 if round_no == 0 else 0)

    expected: dict[str, int] = {}
    for round_no in range(3):
        for tag in ("a", "b", "c", "d"):
            for p in batch(f"{tag}{round_no}", 200, 50):
                expected.setdefault(p.event_id, p.merchant_net)
    hot = sum(net for event_id, net in expected.items() if "_o" not in event_id)
    conn = ledger_conn
    assert await balance(conn, "merchant:m_hot:available:USD") == hot
    report = await verify(conn)
    assert report.ok, report.violations
    totals = await totals_by_currency(conn)
    assert totals["USD"].captures == len(expected)
    assert totals["USD"].merchant_net == sum(expected.values())
    assert totals["USD"].merchant_wallets == sum(expected.values())
