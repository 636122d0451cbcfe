"""The double-entry ledger sink: captures posted to an append-only journal in PostgreSQL.

Conventions (binding for every writer of the ledger tables; see ``sinks/sql/0001_ledger.sql``)

* Money is an ``int`` of minor units of the account's currency (ISO 4217 exponent: JPY 0,
  USD 2, KWD 3). No floats; PostgreSQL sums (``numeric``) are converted to ``int`` exactly.
* ``ledger_entries.amount`` is signed: a **debit is positive, a credit is negative**. The
  entries of every transaction sum to zero per currency (PostgreSQL refuses an INSERT
  statement that leaves a transaction unbalanced, so a transaction's entries are always
  inserted by one statement).
* ``ledger_accounts.balance`` is kept in the account's *normal* orientation: for a
  debit-normal account (assets) ``balance == sum(amount)``; for a credit-normal account
  (liabilities, revenue) ``balance == -sum(amount)``. A ``no_overdraft`` account (merchant
  wallets) can never go below zero (a CHECK constraint).
* The journal is append-only (triggers refuse UPDATE/DELETE/TRUNCATE); corrections are new
  transactions. ``ledger_transactions.event_id`` is the idempotency key of a posting: an
  event posts at most once, however often it is delivered.

A capture of ``amount`` with processing fee ``fee`` posts one transaction (kind
``capture``)::

    debit  psp clearing   (asset, normal debit)       +amount
    credit merchant wallet (liability, normal credit)  -(amount - fee)
    credit fee revenue    (revenue, normal credit)     -fee

Zero legs are omitted (no entry for a zero fee, nor for the wallet when the fee takes the
whole amount). Rounding: the ledger does not round. Fees arrive already computed in minor
units (see :func:`schemas.money.fee_for`, which rounds the percentage part half up with
integers and never exceeds the amount); the merchant is credited exactly ``amount - fee``,
so nothing is lost or created by rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Literal, Self

import asyncpg
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from schemas.currencies import exponent
from schemas.money import MAX_AMOUNT_MINOR, Currency

__all__ = [
    "CAPTURE_KIND",
    "AccountSpec",
    "CapturePosting",
    "CurrencyTotals",
    "CurrencyVolume",
    "LedgerReport",
    "Violation",
    "ViolationKind",
    "fee_revenue_account",
    "merchant_wallet_account",
    "post_captures",
    "psp_clearing_account",
    "totals_by_currency",
    "verify",
]

CAPTURE_KIND = "capture"
"""``ledger_transactions.kind`` of a capture posting."""

AccountKind = Literal["asset", "liability", "revenue", "expense", "equity"]
NormalBalance = Literal["debit", "credit"]

PLATFORM_OWNER = "platform"
_PSP_CLEARING_PREFIX = "platform:psp_clearing:"
_FEE_REVENUE_PREFIX = "platform:fee_revenue:"
_MERCHANT_PREFIX = "merchant:"
_WALLET_INFIX = ":available:"

NonEmptyStr = Annotated[str, Field(min_length=1, max_length=255)]


# --------------------------------------------------------------------------- accounts


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """Everything needed to create one ledger account (its row minus id and balance)."""

    code: str
    owner: str
    kind: AccountKind
    currency: str
    normal_balance: NormalBalance
    no_overdraft: bool = False


def _checked_currency(currency: str) -> str:
    exponent(currency)  # raises UnknownCurrencyError (a ValueError) for unknown codes
    return currency


def psp_clearing_account(currency: str) -> AccountSpec:
    """Customer funds receivable from the PSP (asset, normal debit).

    Code ``platform:psp_clearing:<CUR>``, owner ``platform``.
    """
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_PSP_CLEARING_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="asset",
        currency=currency,
        normal_balance="debit",
    )


def merchant_wallet_account(merchant_id: str, currency: str) -> AccountSpec:
    """What we owe the merchant (liability, normal credit, never negative).

    Code ``merchant:<merchant_id>:available:<CUR>``, owner ``merchant:<merchant_id>``.
    """
    if not merchant_id:
        raise ValueError("merchant_id must not be empty")
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_MERCHANT_PREFIX}{merchant_id}{_WALLET_INFIX}{currency}",
        owner=f"{_MERCHANT_PREFIX}{merchant_id}",
        kind="liability",
        currency=currency,
        normal_balance="credit",
        no_overdraft=True,
    )


def fee_revenue_account(currency: str) -> AccountSpec:
    """Processing fees we earned (revenue, normal credit).

    Code ``platform:fee_revenue:<CUR>``, owner ``platform``.
    """
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_FEE_REVENUE_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="revenue",
        currency=currency,
        normal_balance="credit",
    )


# --------------------------------------------------------------------------- postings


class CapturePosting(BaseModel):
    """One captured payment to post: ``amount`` and ``fee`` in minor units of ``currency``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: NonEmptyStr
    payment_id: NonEmptyStr
    merchant_id: NonEmptyStr
    amount: Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MINOR)]
    fee: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]
    currency: Currency
    occurred_at: AwareDatetime

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return _checked_currency(value)

    @model_validator(mode="after")
    def _fee_within_amount(self) -> Self:
        if self.fee > self.amount:
            raise ValueError(f"fee {self.fee} exceeds amount {self.amount}")
        return self

    @property
    def merchant_net(self) -> int:
        """What the merchant is credited: ``amount - fee``."""
        return self.amount - self.fee

    def accounts(self) -> tuple[AccountSpec, AccountSpec, AccountSpec]:
        """(psp clearing, merchant wallet, fee revenue) accounts of this posting."""
        return (
            psp_clearing_account(self.currency),
            merchant_wallet_account(self.merchant_id, self.currency),
            fee_revenue_account(self.currency),
        )


_INSERT_ACCOUNTS = """
INSERT INTO ledger_accounts (code, owner, kind, currency, normal_balance, no_overdraft)
SELECT code, owner, kind, currency, normal_balance, no_overdraft
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
       AS a(code, owner, kind, currency, normal_balance, no_overdraft)
 ORDER BY code
ON CONFLICT (code) DO NOTHING
"""

# Row locks in ascending id order: concurrent batches touching the same accounts queue up
# behind each other instead of deadlocking (LockRows runs above the Sort node).
_LOCK_ACCOUNTS = """
SELECT id, code, currency
  FROM ledger_accounts
 WHERE code = ANY($1::text[])
 ORDER BY id
   FOR UPDATE
"""

# One statement: new transactions (already-posted event ids skipped), their entries, and
# the balance deltas aggregated per account. Returns the number of new transactions.
_POST = """
WITH input AS (
    SELECT *
      FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[],
                  $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
           AS t(event_id, payment_id, merchant_id, occurred_at, currency,
                amount, fee, clearing_id, wallet_id, revenue_id)
),
tx AS (
    INSERT INTO ledger_transactions (event_id, kind, payment_id, merchant_id, occurred_at)
    SELECT event_id, $11::text, payment_id, merchant_id, occurred_at
      FROM input
     ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id, event_id
),
ent AS (
    INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)
    SELECT tx.id, leg.account_id, leg.amount, i.currency
      FROM tx
      JOIN input i USING (event_id)
     CROSS JOIN LATERAL (VALUES (1, i.clearing_id, i.amount),
                                (2, i.wallet_id, i.fee - i.amount),
                                (3, i.revenue_id, -i.fee)) AS leg(n, account_id, amount)
     WHERE leg.amount <> 0
     ORDER BY tx.id, leg.n
    RETURNING account_id, amount
),
delta AS (
    SELECT account_id, sum(amount)::bigint AS amount FROM ent GROUP BY account_id
),
upd AS (
    UPDATE ledger_accounts a
       SET balance = a.balance
                     + CASE WHEN a.normal_balance = 'debit' THEN d.amount ELSE -d.amount END
      FROM delta d
     WHERE a.id = d.account_id
    RETURNING a.id
)
SELECT (SELECT count(*) FROM tx) AS posted, (SELECT count(*) FROM upd) AS accounts
"""


def _dedupe(postings: Iterable[CapturePosting]) -> list[CapturePosting]:
    """First posting of each event id, sorted by event id (a stable lock order)."""
    first: dict[str, CapturePosting] = {}
    for posting in postings:
        first.setdefault(posting.event_id, posting)
    return [first[event_id] for event_id in sorted(first)]


async def post_captures(conn: asyncpg.Connection, postings: Sequence[CapturePosting]) -> int:
    """Post a batch of captures in one database transaction; return how many were new.

    Idempotent on ``event_id``: events already in the journal are skipped, and a repeated
    event id inside the batch posts once (its first occurrence wins). Three statements in
    one transaction whatever the batch size: create missing accounts, lock the batch's
    accounts in id order (so concurrent batches on a hot merchant wallet serialise rather
    than deadlock), then insert transactions + entries and apply the per-account balance
    deltas. If ``conn`` is already in a transaction this runs in a savepoint; the
    transaction must be READ COMMITTED (PostgreSQL's default), so accounts created by a
    concurrent batch are visible once it commits. A non-capture event id already in the
    journal, or a repeat with a different payload, is skipped too (first posting wins).
    """
    batch = _dedupe(postings)
    if not batch:
        return 0
    specs: dict[str, AccountSpec] = {}
    for posting in batch:
        for spec in posting.accounts():
            specs.setdefault(spec.code, spec)
    ordered = [specs[code] for code in sorted(specs)]

    async with conn.transaction():
        await conn.execute(
            _INSERT_ACCOUNTS,
            [s.code for s in ordered],
            [s.owner for s in ordered],
            [s.kind for s in ordered],
            [s.currency for s in ordered],
            [s.normal_balance for s in ordered],
            [s.no_overdraft for s in ordered],
        )
        rows = await conn.fetch(_LOCK_ACCOUNTS, [s.code for s in ordered])
        ids: dict[str, int] = {}
        for row in rows:
            spec = specs[row["code"]]
            if row["currency"] != spec.currency:  # cannot happen: the code embeds it
                raise RuntimeError(f"account {spec.code} has currency {row['currency']}")
            ids[row["code"]] = row["id"]
        missing = sorted(set(specs) - set(ids))
        if missing:
            raise RuntimeError(f"ledger accounts missing after insert: {missing}")

        legs = [tuple(ids[spec.code] for spec in p.accounts()) for p in batch]
        row = await conn.fetchrow(
            _POST,
            [p.event_id for p in batch],
            [p.payment_id for p in batch],
            [p.merchant_id for p in batch],
            [p.occurred_at for p in batch],
            [p.currency for p in batch],
            [p.amount for p in batch],
            [p.fee for p in batch],
            [leg[0] for leg in legs],
            [leg[1] for leg in legs],
            [leg[2] for leg in legs],
            CAPTURE_KIND,
        )
    if row is None:  # pragma: no cover - a SELECT without FROM always returns one row
        raise RuntimeError("ledger post statement returned no row")
    posted: int = row["posted"]
    return posted


# --------------------------------------------------------------------------- verification

ViolationKind = Literal[
    "currency_imbalance",
    "transaction_imbalance",
    "transaction_without_entries",
    "balance_mismatch",
    "overdraft",
    "currency_mismatch",
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


def _to_int(value: int | Decimal | None) -> int:
    """Exact int from a PostgreSQL ``numeric`` sum (never via float)."""
    if value is None:
        return 0
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ValueError(f"non-integral ledger sum {value}")
        return int(value)
    return value


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
    asyncpg.Record | None,
]


async def _verify_queries(conn: asyncpg.Connection) -> _VerifyRows:
    return (
        await conn.fetch(_VERIFY_CURRENCIES),
        await conn.fetch(_VERIFY_TRANSACTIONS),
        await conn.fetch(_VERIFY_EMPTY_TRANSACTIONS),
        await conn.fetch(_VERIFY_ACCOUNTS),
        await conn.fetch(_VERIFY_ENTRY_CURRENCIES),
        await conn.fetchrow(_COUNTS),
    )


async def verify(conn: asyncpg.Connection) -> LedgerReport:
    """Check every ledger invariant against the database; never raises on a violation.

    Checks: per currency, debits == credits; every transaction's entries sum to zero per
    currency; every transaction has entries; every account balance equals the sum of its
    entries (in the account's normal orientation); no ``no_overdraft`` account is below
    zero; every entry's currency is its account's currency. Reads one consistent snapshot
    (a REPEATABLE READ, read-only transaction), or runs inside the caller's transaction
    when ``conn`` is already in one.
    """
    violations: list[Violation] = []
    if conn.is_in_transaction():  # the caller's transaction decides the snapshot
        rows = await _verify_queries(conn)
    else:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await _verify_queries(conn)
    currency_rows, transaction_rows, empty_rows, account_rows, mismatch_rows, counts = rows

    currencies: dict[str, CurrencyVolume] = {}
    for row in currency_rows:
        volume = CurrencyVolume(
            currency=row["currency"],
            debits=_to_int(row["debits"]),
            credits=_to_int(row["credits"]),
            entries=row["entries"],
            transactions=row["transactions"],
        )
        currencies[volume.currency] = volume
        if not volume.balanced:
            violations.append(
                Violation(
                    kind="currency_imbalance",
                    currency=volume.currency,
                    detail=(
                        f"{volume.currency}: debits {volume.debits} != credits {volume.credits}"
                    ),
                )
            )
    for row in transaction_rows:
        violations.append(
            Violation(
                kind="transaction_imbalance",
                currency=row["currency"],
                transaction_id=row["transaction_id"],
                event_id=row["event_id"],
                detail=(
                    f"transaction {row['transaction_id']} ({row['event_id']}) entries sum to "
                    f"{_to_int(row['total'])} {row['currency']}"
                ),
            )
        )
    for row in empty_rows:
        violations.append(
            Violation(
                kind="transaction_without_entries",
                transaction_id=row["id"],
                event_id=row["event_id"],
                detail=f"transaction {row['id']} ({row['event_id']}) has no entries",
            )
        )
    for row in account_rows:
        total = _to_int(row["entries_total"])
        expected = total if row["normal_balance"] == "debit" else -total
        if row["balance"] != expected:
            violations.append(
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
            violations.append(
                Violation(
                    kind="overdraft",
                    currency=row["currency"],
                    account_code=row["code"],
                    detail=f"{row['code']}: no-overdraft account at {row['balance']}",
                )
            )
    for row in mismatch_rows:
        violations.append(
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
        )
    if counts is None:  # pragma: no cover - a SELECT without FROM always returns one row
        raise RuntimeError("ledger count query returned no row")
    return LedgerReport(
        currencies=currencies,
        accounts=counts["accounts"],
        transactions=counts["transactions"],
        entries=counts["entries"],
        violations=violations,
    )


# --------------------------------------------------------------------------- run summary


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
     WHERE t.kind = $1
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
    """Captured volume, fees and merchant wallet totals per currency (for a run summary)."""
    rows = await conn.fetch(
        _TOTALS,
        CAPTURE_KIND,
        _PSP_CLEARING_PREFIX,
        _FEE_REVENUE_PREFIX,
        _MERCHANT_PREFIX,
    )
    return {
        row["currency"]: CurrencyTotals(
            currency=row["currency"],
            captures=row["captures"],
            captured=_to_int(row["captured"]),
            fees=_to_int(row["fees"]),
            merchant_net=_to_int(row["merchant_net"]),
            merchant_wallets=_to_int(row["merchant_wallets"]),
        )
        for row in rows
    }
