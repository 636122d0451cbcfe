"""``verify``: every ledger invariant checked against the database (``paystream ledger
verify``, benchmarks, tests)."""

from __future__ import annotations

from typing import Literal

import asyncpg
from pydantic import BaseModel, ConfigDict

from sinks.ledger.accounts import (
    FEE_REVENUE_PREFIX,
    PSP_CLEARING_PREFIX,
    PSP_PENDING_PREFIX,
    to_int,
)
from sinks.ledger.captures import CAPTURE_KIND
from sinks.ledger.disputes import DISPUTE_KIND
from sinks.ledger.holds import AUTHORIZATION_KIND, HOLD_CAPTURE_KIND, HOLD_RELEASE_KIND
from sinks.ledger.refunds import REFUND_KIND

ViolationKind = Literal[
    "currency_imbalance",
    "transaction_imbalance",
    "transaction_without_entries",
    "balance_mismatch",
    "overdraft",
    "currency_mismatch",
    "hold_over_resolved",
    "hold_mismatch",
    "refund_exceeds_captured",
    "payment_mismatch",
]


class Violation(BaseModel):
    """One broken ledger invariant."""

    model_config = ConfigDict(frozen=True)

    kind: ViolationKind
    detail: str
    currency: str | None = None
    account_code: str | None = None
    transaction_id: int | None = None
    event_id: str | None = None


class CurrencyVolume(BaseModel):
    """Journal totals of one currency: ``debits == credits`` when it balances."""

    model_config = ConfigDict(frozen=True)

    currency: str
    debits: int
    """Sum of debit entries (positive amounts), minor units."""
    credits: int
    """Sum of credit entries, as a positive number of minor units."""
    entries: int
    transactions: int

    @property
    def balanced(self) -> bool:
        return self.debits == self.credits


class LedgerReport(BaseModel):
    """The result of :func:`verify`: per-currency totals and every violation found."""

    model_config = ConfigDict(frozen=True)

    currencies: dict[str, CurrencyVolume]
    accounts: int
    transactions: int
    entries: int
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.violations


_VERIFY_CURRENCIES = """
SELECT currency::text AS currency,
       coalesce(sum(amount) FILTER (WHERE amount > 0), 0) AS debits,
       coalesce(-sum(amount) FILTER (WHERE amount < 0), 0) AS credits,
       count(*) AS entries,
       count(DISTINCT transaction_id) AS transactions
  FROM ledger_entries
 GROUP BY currency
 ORDER BY currency
"""

_VERIFY_TRANSACTIONS = """
SELECT e.transaction_id, t.event_id, e.currency::text AS currency, sum(e.amount) AS total
  FROM ledger_entries e
  JOIN ledger_transactions t ON t.id = e.transaction_id
 GROUP BY e.transaction_id, t.event_id, e.currency
HAVING sum(e.amount) <> 0
 ORDER BY e.transaction_id, e.currency
"""

_VERIFY_EMPTY_TRANSACTIONS = """
SELECT t.id, t.event_id
  FROM ledger_transactions t
 WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.transaction_id = t.id)
 ORDER BY t.id
"""

_VERIFY_ACCOUNTS = """
SELECT a.code, a.currency::text AS currency, a.normal_balance, a.no_overdraft, a.balance,
       coalesce(s.total, 0) AS entries_total
  FROM ledger_accounts a
  LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger_entries GROUP BY account_id) s
    ON s.account_id = a.id
 ORDER BY a.id
"""

_VERIFY_ENTRY_CURRENCIES = """
SELECT e.id, e.transaction_id, e.currency::text AS entry_currency,
       a.code, a.currency::text AS account_currency
  FROM ledger_entries e
  JOIN ledger_accounts a ON a.id = e.account_id
 WHERE e.currency <> a.currency
 ORDER BY e.id
"""

# Each hold against the journal: its authorization, captures and (at most one) release
# on the psp pending account; never resolved beyond its amount.
_VERIFY_HOLDS = """
WITH j AS (
    SELECT t.payment_id, e.currency::text AS currency,
           coalesce(sum(e.amount) FILTER (WHERE t.kind = $1), 0) AS amount,
           coalesce(-sum(e.amount) FILTER (WHERE t.kind = $2), 0) AS captured,
           coalesce(-sum(e.amount) FILTER (WHERE t.kind = $3), 0) AS released,
           count(DISTINCT t.id) FILTER (WHERE t.kind = $1) AS authorizations,
           count(DISTINCT t.id) FILTER (WHERE t.kind = $3) AS releases
      FROM ledger_transactions t
      JOIN ledger_entries e ON e.transaction_id = t.id
      JOIN ledger_accounts a ON a.id = e.account_id
     WHERE t.kind IN ($1, $2, $3) AND starts_with(a.code, $4)
     GROUP BY t.payment_id, e.currency
)
SELECT coalesce(h.payment_id, j.payment_id) AS payment_id,
       coalesce(h.currency::text, j.currency) AS currency,
       h.amount AS hold_amount, h.captured AS hold_captured, h.released AS hold_released,
       j.amount, j.captured, j.released, j.authorizations, j.releases
  FROM ledger_holds h
  FULL JOIN j ON j.payment_id = h.payment_id AND j.currency = h.currency::text
 WHERE h.payment_id IS NULL OR j.payment_id IS NULL
    OR h.amount <> j.amount OR h.captured <> j.captured OR h.released <> j.released
    OR h.captured + h.released > h.amount OR j.captured + j.released > j.amount
    OR j.authorizations <> 1 OR j.releases > 1
 ORDER BY 1
"""

# Each payment's counters against the journal, and refunds + disputes <= captured.
_VERIFY_PAYMENTS = """
WITH j AS (
    SELECT t.payment_id, e.currency::text AS currency,
           coalesce(sum(e.amount) FILTER (
               WHERE t.kind IN ($1, $2) AND starts_with(a.code, $5)), 0) AS captured,
           coalesce(-sum(e.amount) FILTER (
               WHERE t.kind IN ($1, $2) AND starts_with(a.code, $6)), 0) AS fees,
           coalesce(-sum(e.amount) FILTER (
               WHERE t.kind = $3 AND starts_with(a.code, $5)), 0) AS refunded,
           coalesce(sum(e.amount) FILTER (
               WHERE t.kind = $3 AND starts_with(a.code, $6)), 0) AS fees_refunded,
           coalesce(-sum(e.amount) FILTER (
               WHERE t.kind = $4 AND starts_with(a.code, $5)), 0) AS disputed
      FROM ledger_transactions t
      JOIN ledger_entries e ON e.transaction_id = t.id
      JOIN ledger_accounts a ON a.id = e.account_id
     WHERE t.kind IN ($1, $2, $3, $4) AND t.payment_id IS NOT NULL
     GROUP BY t.payment_id, e.currency
)
SELECT coalesce(p.payment_id, j.payment_id) AS payment_id,
       coalesce(p.currency::text, j.currency) AS currency,
       p.captured AS p_captured, p.fees AS p_fees, p.refunded AS p_refunded,
       p.fees_refunded AS p_fees_refunded, p.disputed AS p_disputed,
       j.captured, j.fees, j.refunded, j.fees_refunded, j.disputed
  FROM ledger_payments p
  FULL JOIN j ON j.payment_id = p.payment_id AND j.currency = p.currency::text
 WHERE p.payment_id IS NULL OR j.payment_id IS NULL
    OR p.captured <> j.captured OR p.fees <> j.fees OR p.refunded <> j.refunded
    OR p.fees_refunded <> j.fees_refunded OR p.disputed <> j.disputed
    OR j.refunded + j.disputed > j.captured OR p.refunded + p.disputed > p.captured
 ORDER BY 1, 2
"""

_COUNTS = """
SELECT (SELECT count(*) FROM ledger_accounts) AS accounts,
       (SELECT count(*) FROM ledger_transactions) AS transactions,
       (SELECT count(*) FROM ledger_entries) AS entries
"""


_VerifyRows = tuple[
    list[asyncpg.Record],
    list[asyncpg.Record],
    list[asyncpg.Record],
    list[asyncpg.Record],
    list[asyncpg.Record],
    list[asyncpg.Record],
    list[asyncpg.Record],
    asyncpg.Record | None,
]


async def _verify_queries(conn: asyncpg.Connection) -> _VerifyRows:
    return (
        await conn.fetch(_VERIFY_CURRENCIES),
        await conn.fetch(_VERIFY_TRANSACTIONS),
        await conn.fetch(_VERIFY_EMPTY_TRANSACTIONS),
        await conn.fetch(_VERIFY_ACCOUNTS),
        await conn.fetch(_VERIFY_ENTRY_CURRENCIES),
        await conn.fetch(
            _VERIFY_HOLDS,
            AUTHORIZATION_KIND,
            HOLD_CAPTURE_KIND,
            HOLD_RELEASE_KIND,
            PSP_PENDING_PREFIX,
        ),
        await conn.fetch(
            _VERIFY_PAYMENTS,
            CAPTURE_KIND,
            HOLD_CAPTURE_KIND,
            REFUND_KIND,
            DISPUTE_KIND,
            PSP_CLEARING_PREFIX,
            FEE_REVENUE_PREFIX,
        ),
        await conn.fetchrow(_COUNTS),
    )


async def verify(conn: asyncpg.Connection) -> LedgerReport:
    """Check every ledger invariant against the database; never raises on a violation.

    Checks: per currency, debits == credits; every transaction's entries sum to zero per
    currency; every transaction has entries; every account balance equals the sum of its
    entries (in the account's normal orientation); no ``no_overdraft`` account is below
    zero; every entry's currency is its account's currency; every hold matches its
    journal (one authorization, at most one release, ``captured + released <= amount``:
    never over-captured nor resolved twice); every payment's counters match its journal
    and its refunds + disputes never exceed what was captured. Reads one consistent snapshot
    (a REPEATABLE READ, read-only transaction), or runs inside the caller's transaction
    when ``conn`` is already in one.
    """
    if conn.is_in_transaction():  # the caller's transaction decides the snapshot
        rows = await _verify_queries(conn)
    else:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await _verify_queries(conn)
    (
        currency_rows,
        transaction_rows,
        empty_rows,
        account_rows,
        mismatch_rows,
        hold_rows,
        payment_rows,
        counts,
    ) = rows

    currencies = _currency_volumes(currency_rows)
    violations = _imbalance_violations(currencies)
    violations.extend(_transaction_violations(transaction_rows, empty_rows))
    violations.extend(_account_violations(account_rows))
    violations.extend(_currency_mismatch_violations(mismatch_rows))
    violations.extend(_hold_violations(hold_rows))
    violations.extend(_payment_violations(payment_rows))
    if counts is None:  # pragma: no cover - a SELECT without FROM always returns one row
        raise RuntimeError("ledger count query returned no row")
    return LedgerReport(
        currencies=currencies,
        accounts=counts["accounts"],
        transactions=counts["transactions"],
        entries=counts["entries"],
        violations=violations,
    )


def _currency_volumes(rows: list[asyncpg.Record]) -> dict[str, CurrencyVolume]:
    currencies: dict[str, CurrencyVolume] = {}
    for row in rows:
        volume = CurrencyVolume(
            currency=row["currency"],
            debits=to_int(row["debits"]),
            credits=to_int(row["credits"]),
            entries=row["entries"],
            transactions=row["transactions"],
        )
        currencies[volume.currency] = volume
    return currencies


def _imbalance_violations(currencies: dict[str, CurrencyVolume]) -> list[Violation]:
    return [
        Violation(
            kind="currency_imbalance",
            currency=volume.currency,
            detail=f"{volume.currency}: debits {volume.debits} != credits {volume.credits}",
        )
        for volume in currencies.values()
        if not volume.balanced
    ]


def _transaction_violations(
    unbalanced_rows: list[asyncpg.Record], empty_rows: list[asyncpg.Record]
) -> list[Violation]:
    found: list[Violation] = []
    for row in unbalanced_rows:
        found.append(
            Violation(
                kind="transaction_imbalance",
                currency=row["currency"],
                transaction_id=row["transaction_id"],
                event_id=row["event_id"],
                detail=(
                    f"transaction {row['transaction_id']} ({row['event_id']}) entries sum to "
                    f"{to_int(row['total'])} {row['currency']}"
                ),
            )
        )
    for row in empty_rows:
        found.append(
            Violation(
                kind="transaction_without_entries",
                transaction_id=row["id"],
                event_id=row["event_id"],
                detail=f"transaction {row['id']} ({row['event_id']}) has no entries",
            )
        )
    return found


def _account_violations(rows: list[asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    for row in rows:
        total = to_int(row["entries_total"])
        expected = total if row["normal_balance"] == "debit" else -total
        if row["balance"] != expected:
            found.append(
                Violation(
                    kind="balance_mismatch",
                    currency=row["currency"],
                    account_code=row["code"],
                    detail=(
                        f"{row['code']}: balance {row['balance']} != {expected} from its entries"
                    ),
                )
            )
        if row["no_overdraft"] and row["balance"] < 0:
            found.append(
                Violation(
                    kind="overdraft",
                    currency=row["currency"],
                    account_code=row["code"],
                    detail=f"{row['code']}: no-overdraft account at {row['balance']}",
                )
            )
    return found


def _currency_mismatch_violations(rows: list[asyncpg.Record]) -> list[Violation]:
    return [
        Violation(
            kind="currency_mismatch",
            currency=row["entry_currency"],
            account_code=row["code"],
            transaction_id=row["transaction_id"],
            detail=(
                f"entry {row['id']} in {row['entry_currency']} on account {row['code']} "
                f"in {row['account_currency']}"
            ),
        )
        for row in rows
    ]


def _hold_violations(rows: list[asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    for row in rows:
        table = (row["hold_amount"], row["hold_captured"], row["hold_released"])
        journal = (
            to_int(row["amount"]),
            to_int(row["captured"]),
            to_int(row["released"]),
        )
        over = (
            (row["releases"] or 0) > 1
            or (row["authorizations"] or 0) > 1
            or (table[0] is not None and table[1] + table[2] > table[0])
            or (row["amount"] is not None and journal[1] + journal[2] > journal[0])
        )
        found.append(
            Violation(
                kind="hold_over_resolved" if over else "hold_mismatch",
                currency=row["currency"],
                detail=(
                    f"hold of payment {row['payment_id']}: table (amount, captured, released)"
                    f" = {table}, journal = {journal}, authorizations "
                    f"{row['authorizations'] or 0}, releases {row['releases'] or 0}"
                ),
            )
        )
    return found


def _payment_violations(rows: list[asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    fields = ("captured", "fees", "refunded", "fees_refunded", "disputed")
    for row in rows:
        table = {f: row[f"p_{f}"] for f in fields}
        journal = {f: to_int(row[f]) for f in fields} if row["captured"] is not None else None
        exceeded = (
            journal is not None and journal["refunded"] + journal["disputed"] > journal["captured"]
        ) or (
            table["captured"] is not None
            and table["refunded"] + table["disputed"] > table["captured"]
        )
        found.append(
            Violation(
                kind="refund_exceeds_captured" if exceeded else "payment_mismatch",
                currency=row["currency"],
                detail=f"payment {row['payment_id']}: table {table}, journal {journal}",
            )
        )
    return found
