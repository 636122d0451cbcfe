"""Holds, refunds, payouts, disputes, reports: scenarios against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError

from sinks.ledger import (
    AuthorizationHold,
    CapturePosting,
    DisputePosting,
    FeeTerms,
    HoldCapture,
    HoldRelease,
    PayoutPosting,
    RefundPosting,
    bank_payouts_account,
    expire_holds,
    merchant_balances,
    merchant_fee_terms,
    merchant_statement_rows,
    post_authorizations,
    post_captures,
    post_disputes,
    post_hold_captures,
    post_payouts,
    post_refunds,
    psp_pending_account,
    release_holds,
    set_merchant_fee,
    statement_csv,
    verify,
)
from sinks.migrations import load_migrations, migrate

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
M = "m_1"


def auth(event_id: str, payment_id: str, amount: int, currency: str = "USD") -> AuthorizationHold:
    return AuthorizationHold(
        event_id=event_id,
        payment_id=payment_id,
        merchant_id=M,
        amount=amount,
        currency=currency,
        occurred_at=T0,
    )


def hold_capture(event_id: str, payment_id: str, amount: int, fee: int = 0) -> HoldCapture:
    return HoldCapture(
        event_id=event_id,
        payment_id=payment_id,
        merchant_id=M,
        amount=amount,
        fee=fee,
        currency="USD",
        occurred_at=T0,
    )


def release(event_id: str, payment_id: str, reason: str = "void") -> HoldRelease:
    return HoldRelease.model_validate(
        {
            "event_id": event_id,
            "payment_id": payment_id,
            "merchant_id": M,
            "currency": "USD",
            "reason": reason,
            "occurred_at": T0,
        }
    )


def capture(event_id: str, payment_id: str, amount: int, fee: int = 0) -> CapturePosting:
    return CapturePosting(
        event_id=event_id,
        payment_id=payment_id,
        merchant_id=M,
        amount=amount,
        fee=fee,
        currency="USD",
        occurred_at=T0,
    )


def refund(event_id: str, payment_id: str, amount: int, fee_refund: int = 0) -> RefundPosting:
    return RefundPosting(
        event_id=event_id,
        payment_id=payment_id,
        merchant_id=M,
        refund_id=f"re_{event_id}",
        amount=amount,
        fee_refund=fee_refund,
        currency="USD",
        occurred_at=T0,
    )


def payout(event_id: str, amount: int) -> PayoutPosting:
    return PayoutPosting(
        event_id=event_id,
        merchant_id=M,
        payout_id=f"po_{event_id}",
        amount=amount,
        currency="USD",
        occurred_at=T0,
    )


def dispute(event_id: str, payment_id: str, amount: int) -> DisputePosting:
    return DisputePosting(
        event_id=event_id,
        payment_id=payment_id,
        merchant_id=M,
        dispute_id=f"dp_{event_id}",
        amount=amount,
        currency="USD",
        occurred_at=T0,
    )


async def balance(conn: asyncpg.Connection, code: str) -> int:
    value = await conn.fetchval("SELECT balance FROM ledger_accounts WHERE code = $1", code)
    return 0 if value is None else int(value)


async def hold_row(conn: asyncpg.Connection, payment_id: str) -> tuple[int, int, int]:
    row = await conn.fetchrow(
        "SELECT amount, captured, released FROM ledger_holds WHERE payment_id = $1", payment_id
    )
    assert row is not None
    return row["amount"], row["captured"], row["released"]


# ----------------------------------------------------------------------------- models


def test_posting_validation() -> None:
    with pytest.raises(ValidationError, match="fee 11 exceeds"):
        hold_capture("e", "p", 10, fee=11)
    with pytest.raises(ValidationError, match="fee_refund 11 exceeds"):
        refund("e", "p", 10, fee_refund=11)
    with pytest.raises(ValidationError):
        payout("e", 0)
    with pytest.raises(ValidationError):
        release("e", "p", reason="whim")
    with pytest.raises(ValidationError):  # naive datetimes are refused
        AuthorizationHold(
            event_id="e",
            payment_id="p",
            merchant_id=M,
            amount=1,
            currency="USD",
            occurred_at=datetime(2024, 1, 1),  # noqa: DTZ001 - the point of the test
        )
    with pytest.raises(ValidationError):
        auth("e", "p", 1, currency="XXX")


# ----------------------------------------------------------------------------- holds


async def test_partial_captures_then_void_release_exactly_the_remainder(
    ledger_conn: asyncpg.Connection,
) -> None:
    conn = ledger_conn
    assert (await post_authorizations(conn, [auth("a1", "p1", 1_000)])).posted == 1
    assert (await merchant_balances(conn, M))["USD"].pending == 1_000
    assert await balance(conn, psp_pending_account("USD").code) == 1_000

    first = await post_hold_captures(conn, [hold_capture("c1", "p1", 300, fee=9)])
    second = await post_hold_captures(conn, [hold_capture("c2", "p1", 200, fee=6)])
    assert first.posted == second.posted == 1
    assert await hold_row(conn, "p1") == (1_000, 500, 0)

    voided = await release_holds(conn, [release("v1", "p1")])
    assert voided.posted == 1 and not voided.rejected
    assert await hold_row(conn, "p1") == (1_000, 500, 500)
    balances = (await merchant_balances(conn, M))["USD"]
    assert balances.pending == 0
    assert balances.available == 500 - 15
    assert await balance(conn, psp_pending_account("USD").code) == 0
    released = await conn.fetchval(
        """SELECT e.amount FROM ledger_entries e
             JOIN ledger_transactions t ON t.id = e.transaction_id
             JOIN ledger_accounts a ON a.id = e.account_id
            WHERE t.event_id = 'v1' AND a.code = $1""",
        psp_pending_account("USD").code,
    )
    assert released == -500  # exactly the remainder, credited back

    # double release: rejected (not raised), nothing posted
    again = await release_holds(conn, [release("v2", "p1"), release("v3", "p1", "expiry")])
    assert again.posted == 0
    assert again.rejected_ids == {"v2": "hold_released", "v3": "hold_released"}
    # no capture after the release either
    late = await post_hold_captures(conn, [hold_capture("c3", "p1", 1)])
    assert late.rejected_ids == {"c3": "hold_released"}
    # replaying the release is a duplicate, not a rejection
    replay = await release_holds(conn, [release("v1", "p1")])
    assert replay.posted == 0 and replay.duplicates == ["v1"] and not replay.rejected
    assert (await verify(conn)).ok


async def test_hold_is_never_captured_beyond_its_amount(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_authorizations(conn, [auth("a1", "p1", 100)])
    result = await post_hold_captures(
        conn,
        [
            hold_capture("c1", "p1", 60),
            hold_capture("c2", "p1", 60),  # would exceed: rejected
            hold_capture("c3", "p1", 40),  # exactly the rest: fine
            hold_capture("c4", "p1", 1),
        ],
    )
    assert result.posted_event_ids == ["c1", "c3"]
    assert result.rejected_ids == {"c2": "capture_exceeds_hold", "c4": "capture_exceeds_hold"}
    assert await hold_row(conn, "p1") == (100, 100, 0)
    # fully captured: nothing to release
    assert (await release_holds(conn, [release("v1", "p1")])).rejected_ids == {
        "v1": "hold_fully_captured"
    }
    # one hold per payment; holds of unknown payments cannot be captured or released
    assert (await post_authorizations(conn, [auth("a2", "p1", 5)])).rejected_ids == {
        "a2": "hold_exists"
    }
    assert (await post_hold_captures(conn, [hold_capture("c5", "nope", 1)])).rejected_ids == {
        "c5": "unknown_hold"
    }
    assert (await release_holds(conn, [release("v2", "nope")])).rejected_ids == {
        "v2": "unknown_hold"
    }
    assert (await verify(conn)).ok


async def test_hold_state_is_guarded_in_sql(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_authorizations(conn, [auth("a1", "p1", 100)])
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("UPDATE ledger_holds SET captured = 101 WHERE payment_id = 'p1'")
    with pytest.raises(asyncpg.CheckViolationError):  # a release must close the hold
        await conn.execute(
            "UPDATE ledger_holds SET released = 10, release_event_id = 'x', "
            "release_reason = 'void' WHERE payment_id = 'p1'"
        )
    await release_holds(conn, [release("v1", "p1")])
    with pytest.raises(asyncpg.CheckViolationError, match="released once"):
        await conn.execute(
            "UPDATE ledger_holds SET release_event_id = 'v2' WHERE payment_id = 'p1'"
        )
    with pytest.raises(asyncpg.RestrictViolationError, match="never deleted"):
        await conn.execute("DELETE FROM ledger_holds")


async def test_expire_holds_releases_old_open_holds_once(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    old = auth("a1", "p_old", 100).model_copy(update={"occurred_at": T0 - timedelta(days=8)})
    await post_authorizations(conn, [old, auth("a2", "p_new", 50)])
    await post_hold_captures(conn, [hold_capture("c1", "p_old", 30)])
    cutoff = T0 - timedelta(days=7)
    result = await expire_holds(conn, cutoff, now=T0)
    assert result.posted_event_ids == ["expiry:p_old"]
    assert await hold_row(conn, "p_old") == (100, 30, 70)
    assert (await expire_holds(conn, cutoff, now=T0)).posted == 0
    assert (await merchant_balances(conn, M))["USD"].pending == 50
    with pytest.raises(ValueError, match="timezone-aware"):
        await expire_holds(conn, datetime(2024, 1, 1))  # noqa: DTZ001 - the point of the test
    assert (await verify(conn)).ok


# ----------------------------------------------------------------------------- refunds


async def test_refunds_never_exceed_captured(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_captures(conn, [capture("c1", "p1", 100, fee=10)])
    result = await post_refunds(
        conn,
        [
            refund("r1", "p1", 60, fee_refund=6),
            refund("r2", "p1", 60),  # 120 > 100
            refund("r3", "p1", 40, fee_refund=5),  # fees refunded 11 > 10
            refund("r4", "p1", 40, fee_refund=4),
            refund("r5", "unknown", 1),
        ],
    )
    assert result.posted_event_ids == ["r1", "r4"]
    assert result.rejected_ids == {
        "r2": "refund_exceeds_captured",
        "r3": "fee_refund_exceeds_fees",
        "r5": "unknown_payment",
    }
    assert "refund exceeds captured" in result.rejected[0].detail
    assert (await merchant_balances(conn, M))["USD"].available == 0
    row = await conn.fetchrow("SELECT * FROM ledger_payments WHERE payment_id = 'p1'")
    assert row is not None
    assert (row["captured"], row["refunded"], row["fees"], row["fees_refunded"]) == (
        100,
        100,
        10,
        10,
    )
    assert (await verify(conn)).ok


async def test_refund_needs_wallet_funds(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_captures(conn, [capture("c1", "p1", 100)])
    await post_payouts(conn, [payout("po1", 80)])
    result = await post_refunds(conn, [refund("r1", "p1", 50)])
    assert result.rejected_ids == {"r1": "insufficient_funds"}
    assert (await post_refunds(conn, [refund("r2", "p1", 20)])).posted == 1
    assert (await verify(conn)).ok


async def test_concurrent_refunds_cannot_exceed_captured(ledger_dsn: str) -> None:
    payment = "p_concurrent"
    setup = await asyncpg.connect(ledger_dsn)
    pool = await asyncpg.create_pool(ledger_dsn, min_size=50, max_size=50)
    try:
        await post_captures(setup, [capture("cc_capture", payment, 100)])
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, list[tuple[str, str]]]:
            async with pool.acquire() as conn:
                await start.wait()
                result = await post_refunds(conn, [refund(f"cc_refund_{i}", payment, 60)])
                return result.posted, [(r.event_id, r.reason) for r in result.rejected]

        tasks = [asyncio.create_task(one(i)) for i in range(50)]
        await asyncio.sleep(0.05)
        start.set()
        outcomes = await asyncio.gather(*tasks)

        assert sum(posted for posted, _ in outcomes) == 1
        rejected = [r for _, rs in outcomes for r in rs]
        assert len(rejected) == 49
        assert {reason for _, reason in rejected} == {"refund_exceeds_captured"}
        refunded = await setup.fetchval(
            "SELECT refunded FROM ledger_payments WHERE payment_id = $1", payment
        )
        journal = await setup.fetchval(
            """SELECT count(*) FROM ledger_transactions
                WHERE payment_id = $1 AND kind = 'refund'""",
            payment,
        )
        assert refunded == 60 and journal == 1
        assert (await verify(setup)).ok
    finally:
        await pool.close()
        await setup.close()


# ----------------------------------------------------------------------------- payouts


async def test_payout_with_insufficient_funds_is_rejected_cleanly(
    ledger_conn: asyncpg.Connection,
) -> None:
    conn = ledger_conn
    await post_captures(conn, [capture("c1", "p1", 1_000, fee=30)])
    result = await post_payouts(conn, [payout("po1", 971), payout("po2", 970), payout("po3", 1)])
    assert result.rejected_ids == {"po1": "insufficient_funds", "po3": "insufficient_funds"}
    assert result.posted_event_ids == ["po2"]
    assert (await merchant_balances(conn, M))["USD"].available == 0
    assert await balance(conn, bank_payouts_account("USD").code) == 970
    # a rejected payout can be delivered again later, once funds arrived
    await post_captures(conn, [capture("c2", "p2", 10)])
    assert (await post_payouts(conn, [payout("po3", 1)])).posted == 1
    assert (await verify(conn)).ok


# ----------------------------------------------------------------------------- disputes


async def test_dispute_beyond_wallet_goes_to_receivable(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_captures(conn, [capture("c1", "p1", 1_000)])
    await post_payouts(conn, [payout("po1", 700)])
    result = await post_disputes(conn, [dispute("d1", "p1", 500)])
    assert result.posted == 1
    balances = (await merchant_balances(conn, M))["USD"]
    assert (balances.available, balances.receivable, balances.net) == (0, 200, -200)
    # refunds + disputes <= captured
    assert (await post_disputes(conn, [dispute("d2", "p1", 501)])).rejected_ids == {
        "d2": "dispute_exceeds_captured"
    }
    assert (await post_refunds(conn, [refund("r1", "p1", 501)])).rejected_ids == {
        "r1": "refund_exceeds_captured"
    }
    assert (await verify(conn)).ok


# ----------------------------------------------------------------------------- verify


async def test_verify_reports_an_over_resolved_hold(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_authorizations(conn, [auth("a1", "p1", 100)])
    await release_holds(conn, [release("v1", "p1")])
    await post_captures(conn, [capture("c1", "p2", 100)])
    assert (await verify(conn)).ok
    tr = conn.transaction()
    await tr.start()
    try:  # superuser tampering, rolled back
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "ALTER TABLE ledger_holds DROP CONSTRAINT ledger_holds_within_amount, "
            "DROP CONSTRAINT ledger_holds_release_once"
        )
        await conn.execute(
            "ALTER TABLE ledger_payments DROP CONSTRAINT ledger_payments_refund_within_captured"
        )
        await conn.execute("UPDATE ledger_holds SET captured = 100 WHERE payment_id = 'p1'")
        await conn.execute("UPDATE ledger_payments SET refunded = 150 WHERE payment_id = 'p2'")
        report = await verify(conn)
    finally:
        await tr.rollback()
    kinds = {v.kind for v in report.violations}
    assert kinds == {"hold_over_resolved", "refund_exceeds_captured"}
    assert (await verify(conn)).ok


# ----------------------------------------------------------------------------- reports


async def test_balances_statement_and_csv(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    await post_authorizations(conn, [auth("a1", "p1", 1_000), auth("a2", "p2", 500, "JPY")])
    await post_hold_captures(conn, [hold_capture("c1", "p1", 1_000, fee=30)])
    await post_refunds(conn, [refund("r1", "p1", 100, fee_refund=3)])
    await post_payouts(conn, [payout("po1", 800)])

    balances = await merchant_balances(conn, M)
    assert set(balances) == {"JPY", "USD"}
    assert (balances["USD"].available, balances["USD"].pending) == (73, 0)
    assert (balances["JPY"].available, balances["JPY"].pending) == (0, 500)
    assert await merchant_balances(conn, "nobody") == {}

    rows = await merchant_statement_rows(conn, M)
    usd_wallet = [r for r in rows if r.account == "available" and r.currency == "USD"]
    assert [(r.kind, r.amount, r.balance_after) for r in usd_wallet] == [
        ("hold_capture", 970, 970),
        ("refund", -97, 873),
        ("payout", -800, 73),
    ]
    assert usd_wallet[1].reference == "re_r1" and usd_wallet[1].payment_id == "p1"
    assert {r.account for r in rows} == {"available", "pending"}

    text = statement_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows)
    last = next(r for r in parsed if r["kind"] == "payout")
    assert (last["amount_minor"], last["amount"], last["balance_after"]) == (
        "-800",
        "-8.00",
        "0.73",
    )
    jpy = next(r for r in parsed if r["currency"] == "JPY")
    assert jpy["amount"] == "500" and jpy["account"] == "pending"
    assert statement_csv([]).splitlines() == [",".join(next(csv.reader(io.StringIO(text))))]

    future = await merchant_statement_rows(conn, M, since=datetime.now(UTC) + timedelta(days=1))
    assert future == []


async def test_merchant_fee_terms(ledger_conn: asyncpg.Connection) -> None:
    conn = ledger_conn
    default = FeeTerms(fee_bps=290, fee_fixed_minor=30)
    assert await merchant_fee_terms(conn, M, "USD", default) == default
    await set_merchant_fee(conn, M, "USD", FeeTerms(fee_bps=150, fee_fixed_minor=0))
    terms = await merchant_fee_terms(conn, M, "USD", default)
    assert terms.fee(10_000) == 150
    assert default.fee(10_000) == 320
    await set_merchant_fee(conn, M, "USD", FeeTerms(fee_bps=100, fee_fixed_minor=5))
    assert (await merchant_fee_terms(conn, M, "USD", default)).fee(1_000) == 15
    with pytest.raises(asyncpg.CheckViolationError):
        await set_merchant_fee(conn, M, "EUR", FeeTerms(fee_bps=10_001, fee_fixed_minor=0))


# ----------------------------------------------------------------------------- migration


def copy_migrations_before_0003(directory: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "sinks" / "sql"
    for migration in load_migrations():
        if migration.version < "0003":
            shutil.copy(source / f"{migration.version}.sql", directory)


async def test_migration_backfills_payments_from_existing_captures(
    fresh_database: Callable[[], Awaitable[str]], tmp_path: Path
) -> None:
    dsn = await fresh_database()
    copy_migrations_before_0003(tmp_path)
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate(conn, directory=tmp_path) == ["0001_ledger", "0002_status"]
        # a capture posted by the pre-0003 code: the same three legs, no payments table
        await conn.execute(
            """
            INSERT INTO ledger_accounts (code, owner, kind, currency, normal_balance,
                                         no_overdraft, balance)
            VALUES ('platform:psp_clearing:USD', 'platform', 'asset', 'USD', 'debit',
                    false, 100),
                   ('merchant:m_1:available:USD', 'merchant:m_1', 'liability', 'USD',
                    'credit', true, 97),
                   ('platform:fee_revenue:USD', 'platform', 'revenue', 'USD', 'credit',
                    false, 3);
            INSERT INTO ledger_transactions (event_id, kind, payment_id, merchant_id,
                                             occurred_at)
            VALUES ('old_capture', 'capture', 'p_old', 'm_1', now());
            INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)
            SELECT t.id, a.id, v.amount, 'USD'
              FROM ledger_transactions t,
                   (VALUES ('platform:psp_clearing:USD', 100),
                           ('merchant:m_1:available:USD', -97),
                           ('platform:fee_revenue:USD', -3)) AS v(code, amount)
              JOIN ledger_accounts a ON a.code = v.code;
            """
        )
        assert "0003_ledger_lifecycle" in await migrate(conn)
        row = await conn.fetchrow("SELECT * FROM ledger_payments WHERE payment_id = 'p_old'")
        assert row is not None and (row["captured"], row["fees"], row["merchant_id"]) == (
            100,
            3,
            "m_1",
        )
        assert (await verify(conn)).ok
        result = await post_refunds(conn, [refund("r1", "p_old", 100)])
        assert result.rejected_ids == {"r1": "insufficient_funds"}  # wallet holds 97
        assert (await post_refunds(conn, [refund("r2", "p_old", 100, fee_refund=3)])).posted == 1
        assert (await verify(conn)).ok
    finally:
        await conn.close()
