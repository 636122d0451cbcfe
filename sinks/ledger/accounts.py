"""Ledger accounts: their codes and kinds, amount types, and the create-and-lock step every
posting starts with (see the package docstring for the account list and conventions)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Literal

import asyncpg
from pydantic import Field, StrictInt

from schemas.currencies import exponent
from schemas.money import MAX_AMOUNT_MINOR

AccountKind = Literal["asset", "liability", "revenue", "expense", "equity"]
NormalBalance = Literal["debit", "credit"]

PLATFORM_OWNER = "platform"
PSP_CLEARING_PREFIX = "platform:psp_clearing:"
FEE_REVENUE_PREFIX = "platform:fee_revenue:"
MERCHANT_PREFIX = "merchant:"
WALLET_INFIX = ":available:"

NonEmptyStr = Annotated[str, Field(min_length=1, max_length=255)]

PSP_PENDING_PREFIX = "platform:psp_clearing_pending:"
BANK_PAYOUTS_PREFIX = "platform:bank_payouts:"


PositiveAmount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MINOR)]
NonNegativeAmount = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """Everything needed to create one ledger account (its row minus id and balance)."""

    code: str
    owner: str
    kind: AccountKind
    currency: str
    normal_balance: NormalBalance
    no_overdraft: bool = False


def checked_currency(currency: str) -> str:
    exponent(currency)  # raises UnknownCurrencyError (a ValueError) for unknown codes
    return currency


def psp_clearing_account(currency: str) -> AccountSpec:
    """Customer funds receivable from the PSP (asset, normal debit).

    Code ``platform:psp_clearing:<CUR>``, owner ``platform``.
    """
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{PSP_CLEARING_PREFIX}{currency}",
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
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{MERCHANT_PREFIX}{merchant_id}{WALLET_INFIX}{currency}",
        owner=f"{MERCHANT_PREFIX}{merchant_id}",
        kind="liability",
        currency=currency,
        normal_balance="credit",
        no_overdraft=True,
    )


def fee_revenue_account(currency: str) -> AccountSpec:
    """Processing fees we earned (revenue, normal credit).

    Code ``platform:fee_revenue:<CUR>``, owner ``platform``.
    """
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{FEE_REVENUE_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="revenue",
        currency=currency,
        normal_balance="credit",
    )


def _merchant_account(
    merchant_id: str, role: str, currency: str, kind: AccountKind, normal: NormalBalance
) -> AccountSpec:
    if not merchant_id:
        raise ValueError("merchant_id must not be empty")
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{MERCHANT_PREFIX}{merchant_id}:{role}:{currency}",
        owner=f"{MERCHANT_PREFIX}{merchant_id}",
        kind=kind,
        currency=currency,
        normal_balance=normal,
        no_overdraft=kind == "liability",
    )


def merchant_pending_account(merchant_id: str, currency: str) -> AccountSpec:
    """The merchant's held authorizations (liability, normal credit, never negative).

    Code ``merchant:<merchant_id>:pending:<CUR>``.
    """
    return _merchant_account(merchant_id, "pending", currency, "liability", "credit")


def merchant_receivable_account(merchant_id: str, currency: str) -> AccountSpec:
    """What the merchant owes us after disputes its wallet could not cover (asset, debit).

    Code ``merchant:<merchant_id>:receivable:<CUR>``.
    """
    return _merchant_account(merchant_id, "receivable", currency, "asset", "debit")


def psp_pending_account(currency: str) -> AccountSpec:
    """Authorized, not yet captured funds (asset, normal debit).

    Code ``platform:psp_clearing_pending:<CUR>``.
    """
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{PSP_PENDING_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="asset",
        currency=currency,
        normal_balance="debit",
    )


def bank_payouts_account(currency: str) -> AccountSpec:
    """Payouts sent to merchants' banks, in transit (liability, normal credit).

    Code ``platform:bank_payouts:<CUR>``.
    """
    currency = checked_currency(currency)
    return AccountSpec(
        code=f"{BANK_PAYOUTS_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="liability",
        currency=currency,
        normal_balance="credit",
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


async def lock_accounts(conn: asyncpg.Connection, specs: dict[str, AccountSpec]) -> dict[str, int]:
    """Create the missing accounts, lock all of them in id order, return their ids."""
    ordered = [specs[code] for code in sorted(specs)]
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
    return ids


def to_int(value: int | Decimal | None) -> int:
    """Exact int from a PostgreSQL ``numeric`` sum (never via float)."""
    if value is None:
        return 0
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ValueError(f"non-integral ledger sum {value}")
        return int(value)
    return value
