"""Read-side reports: capture totals per currency (run summaries), merchant balances and
statements (rows and CSV)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
from pydantic import BaseModel, ConfigDict

from schemas.currencies import exponent
from sinks.ledger.accounts import FEE_REVENUE_PREFIX, MERCHANT_PREFIX, PSP_CLEARING_PREFIX, to_int
from sinks.ledger.captures import CAPTURE_KIND
from sinks.ledger.holds import HOLD_CAPTURE_KIND


class CurrencyTotals(BaseModel):
    """Capture totals of one currency, minor units: ``captured == fees + merchant_net``."""

    model_config = ConfigDict(frozen=True)

    currency: str
    captures: int
    """Number of capture transactions posted."""
    captured: int
    """Captured volume: debits to PSP clearing by captures."""
    fees: int
    """Fee revenue credited by captures."""
    merchant_net: int
    """Credited to merchant wallets by captures (captured - fees)."""
    merchant_wallets: int
    """Current sum of all merchant wallet balances (captures and anything posted since)."""


_TOTALS = """
WITH capture_legs AS (
    SELECT e.currency::text AS currency, e.transaction_id, e.amount, a.code,
           (a.kind = 'liability' AND starts_with(a.owner, $4)) AS is_wallet
      FROM ledger_entries e
      JOIN ledger_transactions t ON t.id = e.transaction_id
      JOIN ledger_accounts a ON a.id = e.account_id
     WHERE t.kind = ANY($1::text[])
),
captures AS (
    SELECT currency,
           count(DISTINCT transaction_id) AS captures,
           coalesce(sum(amount) FILTER (WHERE starts_with(code, $2)), 0) AS captured,
           coalesce(-sum(amount) FILTER (WHERE starts_with(code, $3)), 0) AS fees,
           coalesce(-sum(amount) FILTER (WHERE is_wallet), 0) AS merchant_net
      FROM capture_legs
     GROUP BY currency
),
wallets AS (
    SELECT currency::text AS currency, sum(balance) AS merchant_wallets
      FROM ledger_accounts
     WHERE kind = 'liability' AND starts_with(owner, $4)
     GROUP BY currency
)
SELECT coalesce(c.currency, w.currency) AS currency,
       coalesce(c.captures, 0) AS captures,
       coalesce(c.captured, 0) AS captured,
       coalesce(c.fees, 0) AS fees,
       coalesce(c.merchant_net, 0) AS merchant_net,
       coalesce(w.merchant_wallets, 0) AS merchant_wallets
  FROM captures c
  FULL JOIN wallets w ON w.currency = c.currency
 ORDER BY 1
"""


async def totals_by_currency(conn: asyncpg.Connection) -> dict[str, CurrencyTotals]:
    """Captured volume, fees and merchant wallet totals per currency (for a run summary):
    automatic captures and captures of manual holds alike."""
    rows = await conn.fetch(
        _TOTALS,
        [CAPTURE_KIND, HOLD_CAPTURE_KIND],
        PSP_CLEARING_PREFIX,
        FEE_REVENUE_PREFIX,
        MERCHANT_PREFIX,
    )
    return {
        row["currency"]: CurrencyTotals(
            currency=row["currency"],
            captures=row["captures"],
            captured=to_int(row["captured"]),
            fees=to_int(row["fees"]),
            merchant_net=to_int(row["merchant_net"]),
            merchant_wallets=to_int(row["merchant_wallets"]),
        )
        for row in rows
    }


# --------------------------------------------------------------------------- merchant reports


class MerchantBalance(BaseModel):
    """A merchant's balances in one currency, minor units, in each account's orientation."""

    model_config = ConfigDict(frozen=True)

    currency: str
    available: int = 0
    """The wallet: what can be paid out."""
    pending: int = 0
    """Held authorizations, not yet captured."""
    receivable: int = 0
    """What the merchant owes us (disputes its wallet could not cover)."""

    @property
    def net(self) -> int:
        """``available - receivable``: the merchant's position once its debt is settled."""
        return self.available - self.receivable


_MERCHANT_ACCOUNTS = """
SELECT code, currency::text AS currency, balance
  FROM ledger_accounts
 WHERE owner = $1
 ORDER BY currency, code
"""


def _merchant_role(code: str, owner: str) -> str:
    """``available`` from ``merchant:<id>:available:<CUR>`` (ids may contain colons)."""
    return code[len(owner) + 1 : -4]


async def merchant_balances(
    conn: asyncpg.Connection, merchant_id: str
) -> dict[str, MerchantBalance]:
    """The merchant's balances per currency (currencies it has no account in are absent)."""
    owner = f"{MERCHANT_PREFIX}{merchant_id}"
    per_currency: dict[str, dict[str, int]] = {}
    for row in await conn.fetch(_MERCHANT_ACCOUNTS, owner):
        role = _merchant_role(row["code"], owner)
        per_currency.setdefault(row["currency"], {})[role] = row["balance"]
    return {
        currency: MerchantBalance(
            currency=currency,
            available=roles.get("available", 0),
            pending=roles.get("pending", 0),
            receivable=roles.get("receivable", 0),
        )
        for currency, roles in per_currency.items()
    }


class StatementRow(BaseModel):
    """One entry on one of the merchant's accounts."""

    model_config = ConfigDict(frozen=True)

    entry_id: int
    transaction_id: int
    event_id: str
    kind: str
    payment_id: str | None
    reference: str | None
    occurred_at: datetime
    posted_at: datetime
    account: str
    """The account's role: ``available``, ``pending`` or ``receivable``."""
    currency: str
    amount: int
    """Minor units, signed in the account's orientation: positive grows the balance."""
    balance_after: int
    """The account's balance after this entry."""


_STATEMENT = """
SELECT * FROM (
    SELECT e.id AS entry_id, e.transaction_id, t.event_id, t.kind, t.payment_id,
           t.reference, t.occurred_at, t.posted_at, a.code, e.currency::text AS currency,
           CASE WHEN a.normal_balance = 'debit' THEN e.amount ELSE -e.amount END AS amount,
           sum(CASE WHEN a.normal_balance = 'debit' THEN e.amount ELSE -e.amount END)
               OVER (PARTITION BY e.account_id ORDER BY e.id) AS balance_after
      FROM ledger_accounts a
      JOIN ledger_entries e ON e.account_id = a.id
      JOIN ledger_transactions t ON t.id = e.transaction_id
     WHERE a.owner = $1
) s
 WHERE ($2::timestamptz IS NULL OR s.posted_at >= $2::timestamptz)
   AND ($3::timestamptz IS NULL OR s.posted_at < $3::timestamptz)
 ORDER BY s.entry_id
"""


async def merchant_statement_rows(
    conn: asyncpg.Connection,
    merchant_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[StatementRow]:
    """Every entry on the merchant's accounts, in posting order, with running balances.

    ``since``/``until`` (timezone-aware) bound ``posted_at`` (``until`` exclusive); running
    balances still count the whole history.
    """
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise ValueError("statement bounds must be timezone-aware")
    owner = f"{MERCHANT_PREFIX}{merchant_id}"
    rows = await conn.fetch(_STATEMENT, owner, since, until)
    return [
        StatementRow(
            entry_id=row["entry_id"],
            transaction_id=row["transaction_id"],
            event_id=row["event_id"],
            kind=row["kind"],
            payment_id=row["payment_id"],
            reference=row["reference"],
            occurred_at=row["occurred_at"],
            posted_at=row["posted_at"],
            account=_merchant_role(row["code"], owner),
            currency=row["currency"],
            amount=row["amount"],
            balance_after=to_int(row["balance_after"]),
        )
        for row in rows
    ]


STATEMENT_COLUMNS = (
    "posted_at",
    "occurred_at",
    "kind",
    "event_id",
    "payment_id",
    "reference",
    "account",
    "currency",
    "amount_minor",
    "amount",
    "balance_after_minor",
    "balance_after",
    "transaction_id",
    "entry_id",
)
"""Columns of :func:`statement_csv`, in order."""


def _major(amount: int, currency: str) -> str:
    """Exact major-unit text of a minor-unit amount (``12345`` USD -> ``123.45``)."""
    places = exponent(currency)
    return f"{Decimal(amount).scaleb(-places):.{places}f}"


def statement_csv(rows: Sequence[StatementRow]) -> str:
    """A CSV document (header + one line per row) of statement rows.

    Amounts appear twice: exact minor units and exact major-unit text (never a float).
    Timestamps are ISO 8601 in UTC.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATEMENT_COLUMNS)
    for row in rows:
        writer.writerow(
            (
                row.posted_at.astimezone(UTC).isoformat(),
                row.occurred_at.astimezone(UTC).isoformat(),
                row.kind,
                row.event_id,
                row.payment_id or "",
                row.reference or "",
                row.account,
                row.currency,
                row.amount,
                _major(row.amount, row.currency),
                row.balance_after,
                _major(row.balance_after, row.currency),
                row.transaction_id,
                row.entry_id,
            )
        )
    return out.getvalue()
