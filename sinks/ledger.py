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

Accounts (``<CUR>`` is the ISO code; one account per currency, so an entry's currency is
always its account's currency -- a composite foreign key enforces it):

* ``platform:psp_clearing:<CUR>`` (asset, debit-normal): captured funds receivable from
  the PSP.
* ``platform:psp_clearing_pending:<CUR>`` (asset, debit-normal): authorized, not yet
  captured funds (the platform side of open holds).
* ``platform:fee_revenue:<CUR>`` (revenue, credit-normal): processing fees earned.
* ``platform:bank_payouts:<CUR>`` (liability, credit-normal): payouts sent to merchants'
  banks, in transit (cleared by bank reconciliation, outside this module).
* ``merchant:<id>:available:<CUR>`` (liability, credit-normal, no overdraft): the
  merchant's wallet.
* ``merchant:<id>:pending:<CUR>`` (liability, credit-normal, no overdraft): the merchant's
  held, not yet captured, authorizations.
* ``merchant:<id>:receivable:<CUR>`` (asset, debit-normal): what the merchant owes us
  (disputes beyond its wallet balance).

Posting types (``ledger_transactions.kind``) and their entries (``+`` debit, ``-`` credit;
zero legs are omitted). Every function is idempotent on ``event_id``:

* ``capture`` (:func:`post_captures`, a payment captured without a hold): clearing
  ``+amount``, wallet ``-(amount - fee)``, fee revenue ``-fee``.
* ``authorization`` (:func:`post_authorizations`, phase one): clearing_pending ``+amount``,
  merchant pending ``-amount``; opens the payment's row in ``ledger_holds``.
* ``hold_capture`` (:func:`post_hold_captures`, phase two, full or partial, repeatable up to
  the hold): merchant pending ``+amount``, clearing_pending ``-amount``, clearing
  ``+amount``, wallet ``-(amount - fee)``, fee revenue ``-fee``; ``ledger_holds.captured``
  grows.
* ``hold_release`` (:func:`release_holds` / :func:`expire_holds`, a void or an expiry):
  releases the whole remainder ``r = amount - captured`` once: merchant pending ``+r``,
  clearing_pending ``-r``; the hold is then closed (no capture, no second release).
* ``refund`` (:func:`post_refunds`): wallet ``+(amount - fee_refund)``, fee revenue
  ``+fee_refund``, clearing ``-amount``. Fee policy is the caller's (``fee_refund`` may be 0,
  a proportional share, or the whole fee); the ledger bounds it by the payment's fees.
* ``payout`` (:func:`post_payouts`): wallet ``+amount``, bank_payouts ``-amount``.
* ``dispute`` (:func:`post_disputes`, a chargeback of ``amount``): wallet
  ``+min(amount, wallet balance)``, merchant receivable ``+(the rest)``, clearing
  ``-amount``. Wallets never overdraw, so what the wallet cannot cover becomes a debt of the
  merchant (its receivable) instead of a negative wallet.

Guarantees (modelled on TigerBeetle's two-phase transfers), enforced by PostgreSQL rather
than by callers (``sinks/sql/0003_ledger_lifecycle.sql``):

* A hold resolves at most once: ``captured + released <= amount``, and a release takes the
  whole remainder, once (``ledger_holds`` CHECK constraints, counters only grow).
* Per payment and currency, ``refunded + disputed <= captured`` and
  ``fees_refunded <= fees`` (``ledger_payments`` CHECK constraints). Captures (with or
  without a hold) add to ``captured``.
* Concurrency: every writer first locks the accounts it touches in id order; all postings
  of one merchant share its wallet, so they serialise, and each guard reads committed state
  under that lock (READ COMMITTED). The CHECK constraints are the backstop.
* A posting the rules refuse (a refund beyond what was captured, a payout beyond the
  wallet, a second release...) is *rejected*, not raised: the batch's other postings go on,
  and the :class:`PostingResult` lists each rejected event id with its reason. A rejected
  event leaves no trace, so delivering it again later is evaluated again.

Settlement delay: captures credit the merchant's *available* wallet directly (as before
holds existed), because the pipeline's captures and every deployed ledger already mean
"available" by that account; a ``settle_pending`` step would change what existing captures
mean. ``pending`` is the merchant's held, not yet captured, authorizations.
"""

from __future__ import annotations

import csv
import functools
import io
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Generic, Literal, Self, TypeVar

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
from schemas.money import MAX_AMOUNT_MINOR, Currency, fee_for

__all__ = [
    "AUTHORIZATION_KIND",
    "CAPTURE_KIND",
    "DISPUTE_KIND",
    "HOLD_CAPTURE_KIND",
    "HOLD_RELEASE_KIND",
    "PAYOUT_KIND",
    "REFUND_KIND",
    "STATEMENT_COLUMNS",
    "AccountSpec",
    "AuthorizationHold",
    "CapturePosting",
    "CurrencyTotals",
    "CurrencyVolume",
    "DisputePosting",
    "FeeTerms",
    "HoldCapture",
    "HoldRelease",
    "LedgerReport",
    "MerchantBalance",
    "PayoutPosting",
    "PostingResult",
    "RefundPosting",
    "RejectReason",
    "Rejection",
    "ReleaseReason",
    "StatementRow",
    "Violation",
    "ViolationKind",
    "bank_payouts_account",
    "expire_holds",
    "fee_revenue_account",
    "merchant_balances",
    "merchant_fee_terms",
    "merchant_pending_account",
    "merchant_receivable_account",
    "merchant_statement_rows",
    "merchant_wallet_account",
    "post_authorizations",
    "post_captures",
    "post_disputes",
    "post_hold_captures",
    "post_payouts",
    "post_refunds",
    "psp_clearing_account",
    "psp_pending_account",
    "release_holds",
    "set_merchant_fee",
    "statement_csv",
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
),
pay AS (
    INSERT INTO ledger_payments (payment_id, currency, merchant_id, captured, fees)
    SELECT i.payment_id, i.currency, min(i.merchant_id), sum(i.amount)::bigint,
           sum(i.fee)::bigint
      FROM tx
      JOIN input i USING (event_id)
     GROUP BY i.payment_id, i.currency
     ORDER BY 1, 2
    ON CONFLICT (payment_id, currency) DO UPDATE
       SET captured = ledger_payments.captured + excluded.captured,
           fees = ledger_payments.fees + excluded.fees,
           updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM tx) AS posted, (SELECT count(*) FROM upd) AS accounts,
       (SELECT count(*) FROM pay) AS payments
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
    deltas (and add each new capture to its payment's ``ledger_payments.captured`` and
    ``fees``, the bound refunds are checked against). If ``conn`` is already in a
    transaction this runs in a savepoint; the transaction must be READ COMMITTED
    (PostgreSQL's default), so accounts created by a concurrent batch are visible once it
    commits. A non-capture event id already in the
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


# --------------------------------------------------------------------------- lifecycle

AUTHORIZATION_KIND = "authorization"
HOLD_CAPTURE_KIND = "hold_capture"
HOLD_RELEASE_KIND = "hold_release"
REFUND_KIND = "refund"
PAYOUT_KIND = "payout"
DISPUTE_KIND = "dispute"

_PSP_PENDING_PREFIX = "platform:psp_clearing_pending:"
_BANK_PAYOUTS_PREFIX = "platform:bank_payouts:"

PositiveAmount = Annotated[StrictInt, Field(gt=0, le=MAX_AMOUNT_MINOR)]
NonNegativeAmount = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]


def _merchant_account(
    merchant_id: str, role: str, currency: str, kind: AccountKind, normal: NormalBalance
) -> AccountSpec:
    if not merchant_id:
        raise ValueError("merchant_id must not be empty")
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_MERCHANT_PREFIX}{merchant_id}:{role}:{currency}",
        owner=f"{_MERCHANT_PREFIX}{merchant_id}",
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
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_PSP_PENDING_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="asset",
        currency=currency,
        normal_balance="debit",
    )


def bank_payouts_account(currency: str) -> AccountSpec:
    """Payouts sent to merchants' banks, in transit (liability, normal credit).

    Code ``platform:bank_payouts:<CUR>``.
    """
    currency = _checked_currency(currency)
    return AccountSpec(
        code=f"{_BANK_PAYOUTS_PREFIX}{currency}",
        owner=PLATFORM_OWNER,
        kind="liability",
        currency=currency,
        normal_balance="credit",
    )


class _LifecyclePosting(BaseModel):
    """Fields every lifecycle posting has."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: NonEmptyStr
    merchant_id: NonEmptyStr
    currency: Currency
    occurred_at: AwareDatetime

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return _checked_currency(value)


class AuthorizationHold(_LifecyclePosting):
    """Phase one: hold ``amount`` of an authorized payment (kind ``authorization``)."""

    payment_id: NonEmptyStr
    amount: PositiveAmount


class HoldCapture(_LifecyclePosting):
    """Phase two: capture ``amount`` (fee ``fee``) of the payment's hold, fully or partly."""

    payment_id: NonEmptyStr
    amount: PositiveAmount
    fee: NonNegativeAmount

    @model_validator(mode="after")
    def _fee_within_amount(self) -> Self:
        if self.fee > self.amount:
            raise ValueError(f"fee {self.fee} exceeds amount {self.amount}")
        return self


ReleaseReason = Literal["void", "expiry"]


class HoldRelease(_LifecyclePosting):
    """Release the whole remainder of the payment's hold (a void, or an expiry)."""

    payment_id: NonEmptyStr
    reason: ReleaseReason = "void"


class RefundPosting(_LifecyclePosting):
    """Give ``amount`` of a captured payment back; ``fee_refund`` of our fee goes with it."""

    payment_id: NonEmptyStr
    refund_id: NonEmptyStr
    amount: PositiveAmount
    fee_refund: NonNegativeAmount = 0

    @model_validator(mode="after")
    def _fee_within_amount(self) -> Self:
        if self.fee_refund > self.amount:
            raise ValueError(f"fee_refund {self.fee_refund} exceeds amount {self.amount}")
        return self


class PayoutPosting(_LifecyclePosting):
    """Pay ``amount`` of the merchant's available wallet out to its bank."""

    payout_id: NonEmptyStr
    amount: PositiveAmount


class DisputePosting(_LifecyclePosting):
    """A chargeback of ``amount`` on a captured payment."""

    payment_id: NonEmptyStr
    dispute_id: NonEmptyStr
    amount: PositiveAmount


RejectReason = Literal[
    "hold_exists",
    "unknown_hold",
    "hold_mismatch",
    "hold_released",
    "hold_fully_captured",
    "capture_exceeds_hold",
    "unknown_payment",
    "merchant_mismatch",
    "refund_exceeds_captured",
    "fee_refund_exceeds_fees",
    "dispute_exceeds_captured",
    "insufficient_funds",
    "conflict",
]

_REASON_TEXT: dict[str, str] = {
    "hold_exists": "the payment already has a hold",
    "unknown_hold": "no hold for this payment",
    "hold_mismatch": "the hold belongs to another merchant or currency",
    "hold_released": "the hold was already released (voided or expired)",
    "hold_fully_captured": "the hold was fully captured: nothing left to release",
    "capture_exceeds_hold": "capture exceeds the hold's remaining amount",
    "unknown_payment": "nothing was captured for this payment in this currency",
    "merchant_mismatch": "the payment belongs to another merchant",
    "refund_exceeds_captured": "refund exceeds captured (refunds + disputes > captured)",
    "fee_refund_exceeds_fees": "fee refund exceeds the fees charged on the payment",
    "dispute_exceeds_captured": "dispute exceeds captured (refunds + disputes > captured)",
    "insufficient_funds": "insufficient funds in the merchant's available wallet",
    "conflict": "the ledger state changed under the posting; retry",
}


class Rejection(BaseModel):
    """A posting the ledger refused (nothing was posted for it)."""

    model_config = ConfigDict(frozen=True)

    event_id: str
    reason: RejectReason
    detail: str


class PostingResult(BaseModel):
    """What a batch did: new postings, already-posted event ids, and rejections."""

    model_config = ConfigDict(frozen=True)

    posted: int
    posted_event_ids: list[str]
    duplicates: list[str]
    """Event ids already in the journal (or repeated in the batch): skipped, not rejected."""
    rejected: list[Rejection]

    @property
    def rejected_ids(self) -> dict[str, RejectReason]:
        return {r.event_id: r.reason for r in self.rejected}


# Every lifecycle statement has the same shape: ``chk`` (one row: the reject reason, NULL
# when the posting is acceptable, computed from state read under the accounts' locks),
# ``guard`` (the state change -- hold, payment counters -- returning one row when it
# applied, with the same conditions repeated so it can never overshoot), ``legs`` (the
# entries), then the journal and balance tail below. One statement per posting: a
# transaction's entries are inserted by one statement, as the balance trigger requires.
# Common parameters: $1 event_id, $2 kind, $3 payment_id, $4 merchant_id, $5 occurred_at,
# $6 currency, $7 reference; the kind's own parameters start at $8.
_TAIL = """
tx AS (
    INSERT INTO ledger_transactions
           (event_id, kind, payment_id, merchant_id, occurred_at, reference)
    SELECT $1::text, $2::text, $3::text, $4::text, $5::timestamptz, $7::text FROM guard
    RETURNING id
),
ent AS (
    INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)
    SELECT tx.id, legs.account_id, legs.amount, $6::text
      FROM tx CROSS JOIN legs
     WHERE legs.amount <> 0
     ORDER BY legs.n
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
SELECT (SELECT count(*) FROM tx) AS posted, (SELECT reason FROM chk) AS reason
"""


def _statement(*parts: str) -> str:
    """One lifecycle statement from constant fragments (values are bind parameters)."""
    return "".join(parts)


_HOLD = """
hold AS (
    SELECT merchant_id, currency::text AS currency, amount, captured, released,
           release_event_id
      FROM ledger_holds
     WHERE payment_id = $3::text
),"""

_PAYMENT = """
pay AS (
    SELECT merchant_id, captured, fees, refunded, fees_refunded, disputed
      FROM ledger_payments
     WHERE payment_id = $3::text AND currency = $6::text
),"""

# $8 amount, $9 psp pending, $10 merchant pending
_AUTHORIZE = _statement(
    """
WITH chk AS (
    SELECT CASE WHEN EXISTS (SELECT 1 FROM ledger_holds WHERE payment_id = $3::text)
                THEN 'hold_exists' END AS reason
),
guard AS (
    INSERT INTO ledger_holds
           (payment_id, merchant_id, currency, amount, authorization_event_id, authorized_at)
    SELECT $3::text, $4::text, $6::text, $8::bigint, $1::text, $5::timestamptz
      FROM chk WHERE reason IS NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
),
legs (n, account_id, amount) AS (
    VALUES (1, $9::bigint, $8::bigint), (2, $10::bigint, -$8::bigint)
),""",
    _TAIL,
)

# $8 amount, $9 fee, $10 psp pending, $11 merchant pending, $12 clearing, $13 wallet,
# $14 fee revenue
_HOLD_CAPTURE = _statement(
    "WITH",
    _HOLD,
    _PAYMENT,
    """
chk AS (
    SELECT CASE
           WHEN NOT EXISTS (SELECT 1 FROM hold) THEN 'unknown_hold'
           WHEN (SELECT merchant_id <> $4::text OR currency <> $6::text FROM hold)
                THEN 'hold_mismatch'
           WHEN (SELECT release_event_id IS NOT NULL FROM hold) THEN 'hold_released'
           WHEN (SELECT captured + released + $8::bigint > amount FROM hold)
                THEN 'capture_exceeds_hold'
           WHEN (SELECT merchant_id <> $4::text FROM pay) THEN 'merchant_mismatch'
           END AS reason
),
guard AS (
    UPDATE ledger_holds
       SET captured = captured + $8::bigint,
           resolved_at = CASE WHEN captured + $8::bigint = amount THEN now() END,
           updated_at = now()
     WHERE payment_id = $3::text
       AND (SELECT reason FROM chk) IS NULL
       AND release_event_id IS NULL
       AND captured + released + $8::bigint <= amount
    RETURNING 1
),
payment AS (
    INSERT INTO ledger_payments (payment_id, currency, merchant_id, captured, fees)
    SELECT $3::text, $6::text, $4::text, $8::bigint, $9::bigint FROM guard
    ON CONFLICT (payment_id, currency) DO UPDATE
       SET captured = ledger_payments.captured + excluded.captured,
           fees = ledger_payments.fees + excluded.fees,
           updated_at = now()
    RETURNING 1
),
legs (n, account_id, amount) AS (
    VALUES (1, $11::bigint, $8::bigint),
           (2, $10::bigint, -$8::bigint),
           (3, $12::bigint, $8::bigint),
           (4, $13::bigint, $9::bigint - $8::bigint),
           (5, $14::bigint, -$9::bigint)
),""",
    _TAIL,
)

# $8 release reason, $9 psp pending, $10 merchant pending
_RELEASE = _statement(
    "WITH",
    _HOLD,
    """
chk AS (
    SELECT CASE
           WHEN NOT EXISTS (SELECT 1 FROM hold) THEN 'unknown_hold'
           WHEN (SELECT merchant_id <> $4::text OR currency <> $6::text FROM hold)
                THEN 'hold_mismatch'
           WHEN (SELECT release_event_id IS NOT NULL FROM hold) THEN 'hold_released'
           WHEN (SELECT captured >= amount FROM hold) THEN 'hold_fully_captured'
           END AS reason
),
guard AS (
    UPDATE ledger_holds
       SET released = amount - captured,
           release_event_id = $1::text,
           release_reason = $8::text,
           resolved_at = now(),
           updated_at = now()
     WHERE payment_id = $3::text
       AND (SELECT reason FROM chk) IS NULL
       AND release_event_id IS NULL
       AND captured < amount
    RETURNING released
),
legs (n, account_id, amount) AS (
    SELECT 1, $10::bigint, g.released FROM guard g
    UNION ALL
    SELECT 2, $9::bigint, -g.released FROM guard g
),""",
    _TAIL,
)

# $8 amount, $9 fee refund, $10 clearing, $11 wallet, $12 fee revenue
_REFUND = _statement(
    "WITH",
    _PAYMENT,
    """
chk AS (
    SELECT CASE
           WHEN NOT EXISTS (SELECT 1 FROM pay) THEN 'unknown_payment'
           WHEN (SELECT merchant_id <> $4::text FROM pay) THEN 'merchant_mismatch'
           WHEN (SELECT refunded + disputed + $8::bigint > captured FROM pay)
                THEN 'refund_exceeds_captured'
           WHEN (SELECT fees_refunded + $9::bigint > fees FROM pay)
                THEN 'fee_refund_exceeds_fees'
           WHEN (SELECT balance < $8::bigint - $9::bigint
                   FROM ledger_accounts WHERE id = $11::bigint)
                THEN 'insufficient_funds'
           END AS reason
),
guard AS (
    UPDATE ledger_payments
       SET refunded = refunded + $8::bigint,
           fees_refunded = fees_refunded + $9::bigint,
           updated_at = now()
     WHERE payment_id = $3::text AND currency = $6::text
       AND (SELECT reason FROM chk) IS NULL
       AND refunded + disputed + $8::bigint <= captured
       AND fees_refunded + $9::bigint <= fees
    RETURNING 1
),
legs (n, account_id, amount) AS (
    VALUES (1, $11::bigint, $8::bigint - $9::bigint),
           (2, $12::bigint, $9::bigint),
           (3, $10::bigint, -$8::bigint)
),""",
    _TAIL,
)

# $8 amount, $9 wallet, $10 bank payouts
_PAYOUT = _statement(
    """
WITH chk AS (
    SELECT CASE WHEN (SELECT balance < $8::bigint FROM ledger_accounts WHERE id = $9::bigint)
                THEN 'insufficient_funds' END AS reason
),
guard AS (
    SELECT 1 FROM chk WHERE reason IS NULL
),
legs (n, account_id, amount) AS (
    VALUES (1, $9::bigint, $8::bigint), (2, $10::bigint, -$8::bigint)
),""",
    _TAIL,
)

# $8 amount, $9 clearing, $10 wallet, $11 merchant receivable
_DISPUTE = _statement(
    "WITH",
    _PAYMENT,
    """
chk AS (
    SELECT CASE
           WHEN NOT EXISTS (SELECT 1 FROM pay) THEN 'unknown_payment'
           WHEN (SELECT merchant_id <> $4::text FROM pay) THEN 'merchant_mismatch'
           WHEN (SELECT refunded + disputed + $8::bigint > captured FROM pay)
                THEN 'dispute_exceeds_captured'
           END AS reason
),
guard AS (
    UPDATE ledger_payments
       SET disputed = disputed + $8::bigint, updated_at = now()
     WHERE payment_id = $3::text AND currency = $6::text
       AND (SELECT reason FROM chk) IS NULL
       AND refunded + disputed + $8::bigint <= captured
    RETURNING 1
),
wallet AS (
    SELECT least($8::bigint, greatest(balance, 0)) AS covered
      FROM ledger_accounts WHERE id = $10::bigint
),
legs (n, account_id, amount) AS (
    SELECT 1, $10::bigint, w.covered FROM wallet w
    UNION ALL
    SELECT 2, $11::bigint, $8::bigint - w.covered FROM wallet w
    UNION ALL
    SELECT 3, $9::bigint, -$8::bigint
),""",
    _TAIL,
)

_KNOWN_EVENTS = "SELECT event_id FROM ledger_transactions WHERE event_id = ANY($1::text[])"

_EVENT_ID_CONSTRAINT = "ledger_transactions_event_id_key"

_P = TypeVar("_P", bound=_LifecyclePosting)


@dataclass(frozen=True, slots=True)
class _Kind(Generic[_P]):
    """How one posting type becomes a statement's arguments."""

    kind: str
    sql: str
    accounts: Callable[[_P], tuple[AccountSpec, ...]]
    payment_id: Callable[[_P], str | None]
    reference: Callable[[_P], str | None]
    params: Callable[[_P, Callable[[AccountSpec], int]], tuple[object, ...]]


async def _lock_accounts(conn: asyncpg.Connection, specs: dict[str, AccountSpec]) -> dict[str, int]:
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


def _id_of(ids: dict[str, int], spec: AccountSpec) -> int:
    return ids[spec.code]


async def _post_lifecycle(
    conn: asyncpg.Connection, kind: _Kind[_P], postings: Sequence[_P]
) -> PostingResult:
    """Post each posting with its own statement, all in one database transaction.

    Accounts are created and locked (id order) first, then already-posted event ids are
    read -- under the locks, so a concurrent batch carrying the same event has committed
    -- and skipped; each remaining posting is then checked and posted, or rejected.
    """
    first: dict[str, _P] = {}
    duplicates: list[str] = []
    for posting in postings:
        if posting.event_id in first:
            duplicates.append(posting.event_id)
        else:
            first[posting.event_id] = posting
    batch = list(first.values())  # delivery order: it decides which of two rivals wins
    if not batch:
        return PostingResult(posted=0, posted_event_ids=[], duplicates=duplicates, rejected=[])
    specs: dict[str, AccountSpec] = {}
    for posting in batch:
        for spec in kind.accounts(posting):
            specs.setdefault(spec.code, spec)

    for attempt in range(3):
        try:
            async with conn.transaction():
                ids = await _lock_accounts(conn, specs)
                known = {r["event_id"] for r in await conn.fetch(_KNOWN_EVENTS, list(first))}
                posted: list[str] = []
                rejected: list[Rejection] = []
                skipped = list(duplicates)
                account_id = functools.partial(_id_of, ids)

                for posting in batch:
                    if posting.event_id in known:
                        skipped.append(posting.event_id)
                        continue
                    row = await conn.fetchrow(
                        kind.sql,
                        posting.event_id,
                        kind.kind,
                        kind.payment_id(posting),
                        posting.merchant_id,
                        posting.occurred_at,
                        posting.currency,
                        kind.reference(posting),
                        *kind.params(posting, account_id),
                    )
                    if row is not None and row["posted"] == 1:
                        posted.append(posting.event_id)
                        continue
                    reason = (row["reason"] if row is not None else None) or "conflict"
                    rejected.append(
                        Rejection(
                            event_id=posting.event_id,
                            reason=reason,
                            detail=_REASON_TEXT.get(reason, reason),
                        )
                    )
            return PostingResult(
                posted=len(posted),
                posted_event_ids=posted,
                duplicates=skipped,
                rejected=rejected,
            )
        except asyncpg.UniqueViolationError as exc:
            # The same event id posted concurrently with another payload (other accounts,
            # so our locks did not order us): everything rolled back; read it as known.
            if exc.constraint_name != _EVENT_ID_CONSTRAINT or attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _no_payment(_posting: _LifecyclePosting) -> None:
    return None


_AUTHORIZE_KIND: _Kind[AuthorizationHold] = _Kind(
    kind=AUTHORIZATION_KIND,
    sql=_AUTHORIZE,
    accounts=lambda p: (
        psp_pending_account(p.currency),
        merchant_pending_account(p.merchant_id, p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=_no_payment,
    params=lambda p, acc: (
        p.amount,
        acc(psp_pending_account(p.currency)),
        acc(merchant_pending_account(p.merchant_id, p.currency)),
    ),
)

_HOLD_CAPTURE_KIND: _Kind[HoldCapture] = _Kind(
    kind=HOLD_CAPTURE_KIND,
    sql=_HOLD_CAPTURE,
    accounts=lambda p: (
        psp_pending_account(p.currency),
        merchant_pending_account(p.merchant_id, p.currency),
        psp_clearing_account(p.currency),
        merchant_wallet_account(p.merchant_id, p.currency),
        fee_revenue_account(p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=_no_payment,
    params=lambda p, acc: (
        p.amount,
        p.fee,
        acc(psp_pending_account(p.currency)),
        acc(merchant_pending_account(p.merchant_id, p.currency)),
        acc(psp_clearing_account(p.currency)),
        acc(merchant_wallet_account(p.merchant_id, p.currency)),
        acc(fee_revenue_account(p.currency)),
    ),
)

_RELEASE_KIND: _Kind[HoldRelease] = _Kind(
    kind=HOLD_RELEASE_KIND,
    sql=_RELEASE,
    accounts=lambda p: (
        psp_pending_account(p.currency),
        merchant_pending_account(p.merchant_id, p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=lambda p: p.reason,
    params=lambda p, acc: (
        p.reason,
        acc(psp_pending_account(p.currency)),
        acc(merchant_pending_account(p.merchant_id, p.currency)),
    ),
)

_REFUND_KIND: _Kind[RefundPosting] = _Kind(
    kind=REFUND_KIND,
    sql=_REFUND,
    accounts=lambda p: (
        psp_clearing_account(p.currency),
        merchant_wallet_account(p.merchant_id, p.currency),
        fee_revenue_account(p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=lambda p: p.refund_id,
    params=lambda p, acc: (
        p.amount,
        p.fee_refund,
        acc(psp_clearing_account(p.currency)),
        acc(merchant_wallet_account(p.merchant_id, p.currency)),
        acc(fee_revenue_account(p.currency)),
    ),
)

_PAYOUT_KIND: _Kind[PayoutPosting] = _Kind(
    kind=PAYOUT_KIND,
    sql=_PAYOUT,
    accounts=lambda p: (
        merchant_wallet_account(p.merchant_id, p.currency),
        bank_payouts_account(p.currency),
    ),
    payment_id=_no_payment,
    reference=lambda p: p.payout_id,
    params=lambda p, acc: (
        p.amount,
        acc(merchant_wallet_account(p.merchant_id, p.currency)),
        acc(bank_payouts_account(p.currency)),
    ),
)

_DISPUTE_KIND: _Kind[DisputePosting] = _Kind(
    kind=DISPUTE_KIND,
    sql=_DISPUTE,
    accounts=lambda p: (
        psp_clearing_account(p.currency),
        merchant_wallet_account(p.merchant_id, p.currency),
        merchant_receivable_account(p.merchant_id, p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=lambda p: p.dispute_id,
    params=lambda p, acc: (
        p.amount,
        acc(psp_clearing_account(p.currency)),
        acc(merchant_wallet_account(p.merchant_id, p.currency)),
        acc(merchant_receivable_account(p.merchant_id, p.currency)),
    ),
)


async def post_authorizations(
    conn: asyncpg.Connection, postings: Sequence[AuthorizationHold]
) -> PostingResult:
    """Place pending holds (phase one of a two-phase transfer); one hold per payment.

    Rejected: ``hold_exists`` (the payment already has a hold, under another event id).
    Like every lifecycle function: one database transaction (a savepoint inside the
    caller's), idempotent on ``event_id`` (known ids are listed in ``duplicates``), and a
    refused posting is rejected with its reason, never raised.
    """
    return await _post_lifecycle(conn, _AUTHORIZE_KIND, postings)


async def post_hold_captures(
    conn: asyncpg.Connection, postings: Sequence[HoldCapture]
) -> PostingResult:
    """Capture against holds, fully or partly, several times up to the held amount.

    Rejected: ``unknown_hold``, ``hold_mismatch`` (other merchant or currency),
    ``hold_released`` (voided or expired), ``capture_exceeds_hold``, ``merchant_mismatch``.
    """
    return await _post_lifecycle(conn, _HOLD_CAPTURE_KIND, postings)


async def release_holds(conn: asyncpg.Connection, postings: Sequence[HoldRelease]) -> PostingResult:
    """Void or expire holds: release each hold's whole remainder, at most once.

    Rejected: ``unknown_hold``, ``hold_mismatch``, ``hold_released`` (a second release),
    ``hold_fully_captured`` (nothing left to release).
    """
    return await _post_lifecycle(conn, _RELEASE_KIND, postings)


_OPEN_HOLDS = """
SELECT payment_id, merchant_id, currency::text AS currency
  FROM ledger_holds
 WHERE release_event_id IS NULL AND captured < amount AND authorized_at < $1::timestamptz
 ORDER BY authorized_at, payment_id
 LIMIT $2::int
"""


async def expire_holds(
    conn: asyncpg.Connection,
    authorized_before: datetime,
    *,
    now: datetime | None = None,
    limit: int = 10_000,
) -> PostingResult:
    """Release (reason ``expiry``) the open holds authorized before ``authorized_before``.

    Event ids are ``expiry:<payment_id>``, so running it twice releases nothing twice.
    """
    if authorized_before.tzinfo is None:
        raise ValueError("authorized_before must be timezone-aware")
    occurred_at = now if now is not None else datetime.now(UTC)
    rows = await conn.fetch(_OPEN_HOLDS, authorized_before, limit)
    return await release_holds(
        conn,
        [
            HoldRelease(
                event_id=f"expiry:{row['payment_id']}",
                payment_id=row["payment_id"],
                merchant_id=row["merchant_id"],
                currency=row["currency"],
                reason="expiry",
                occurred_at=occurred_at,
            )
            for row in rows
        ],
    )


async def post_refunds(
    conn: asyncpg.Connection, postings: Sequence[RefundPosting]
) -> PostingResult:
    """Refund captured payments: the merchant's wallet pays back, fees per ``fee_refund``.

    Refunds + disputes never exceed what was captured per payment and currency, even under
    concurrent batches (they serialise on the merchant's wallet lock; a CHECK constraint on
    ``ledger_payments`` is the backstop). Rejected: ``unknown_payment``,
    ``merchant_mismatch``, ``refund_exceeds_captured``, ``fee_refund_exceeds_fees``,
    ``insufficient_funds`` (the wallet cannot cover ``amount - fee_refund``).
    """
    return await _post_lifecycle(conn, _REFUND_KIND, postings)


async def post_payouts(
    conn: asyncpg.Connection, postings: Sequence[PayoutPosting]
) -> PostingResult:
    """Move available merchant funds to ``platform:bank_payouts:<CUR>``.

    Rejected: ``insufficient_funds`` when the wallet would go below zero.
    """
    return await _post_lifecycle(conn, _PAYOUT_KIND, postings)


async def post_disputes(
    conn: asyncpg.Connection, postings: Sequence[DisputePosting]
) -> PostingResult:
    """Chargebacks: debit the merchant's wallet, the excess to its receivable account.

    Rejected: ``unknown_payment``, ``merchant_mismatch``, ``dispute_exceeds_captured``.
    """
    return await _post_lifecycle(conn, _DISPUTE_KIND, postings)


# --------------------------------------------------------------------------- merchant fees


@dataclass(frozen=True, slots=True)
class FeeTerms:
    """A merchant's processing fee: ``fee_fixed_minor + amount * fee_bps / 10000``."""

    fee_bps: int
    fee_fixed_minor: int

    def fee(self, amount: int) -> int:
        return fee_for(amount, self.fee_bps, self.fee_fixed_minor)


async def set_merchant_fee(
    conn: asyncpg.Connection, merchant_id: str, currency: str, terms: FeeTerms
) -> None:
    """Set (insert or replace) a merchant's fee terms in ``currency``."""
    await conn.execute(
        """
        INSERT INTO merchant_fees (merchant_id, currency, fee_bps, fee_fixed_minor)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (merchant_id, currency) DO UPDATE
           SET fee_bps = excluded.fee_bps, fee_fixed_minor = excluded.fee_fixed_minor,
               updated_at = now()
        """,
        merchant_id,
        _checked_currency(currency),
        terms.fee_bps,
        terms.fee_fixed_minor,
    )


async def merchant_fee_terms(
    conn: asyncpg.Connection, merchant_id: str, currency: str, default: FeeTerms
) -> FeeTerms:
    """The merchant's fee terms in ``currency``, or ``default`` when none are set."""
    row = await conn.fetchrow(
        "SELECT fee_bps, fee_fixed_minor FROM merchant_fees "
        "WHERE merchant_id = $1 AND currency = $2",
        merchant_id,
        currency,
    )
    if row is None:
        return default
    return FeeTerms(fee_bps=row["fee_bps"], fee_fixed_minor=row["fee_fixed_minor"])


# --------------------------------------------------------------------------- verification

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
            _PSP_PENDING_PREFIX,
        ),
        await conn.fetch(
            _VERIFY_PAYMENTS,
            CAPTURE_KIND,
            HOLD_CAPTURE_KIND,
            REFUND_KIND,
            DISPUTE_KIND,
            _PSP_CLEARING_PREFIX,
            _FEE_REVENUE_PREFIX,
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
    violations: list[Violation] = []
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


def _hold_violations(rows: list[asyncpg.Record]) -> list[Violation]:
    found: list[Violation] = []
    for row in rows:
        table = (row["hold_amount"], row["hold_captured"], row["hold_released"])
        journal = (
            _to_int(row["amount"]),
            _to_int(row["captured"]),
            _to_int(row["released"]),
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
        journal = {f: _to_int(row[f]) for f in fields} if row["captured"] is not None else None
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
    owner = f"{_MERCHANT_PREFIX}{merchant_id}"
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
    owner = f"{_MERCHANT_PREFIX}{merchant_id}"
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
            balance_after=_to_int(row["balance_after"]),
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
