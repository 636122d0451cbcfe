"""What every lifecycle posting (holds, refunds, payouts, disputes) shares: the posting
base model, the result and rejection types, the common SQL fragments, and the engine that
posts a batch of one kind (one statement per posting, all in one transaction)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict, field_validator

from schemas.money import Currency
from sinks.ledger.accounts import AccountSpec, NonEmptyStr, checked_currency, lock_accounts


class LifecyclePosting(BaseModel):
    """Fields every lifecycle posting has."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: NonEmptyStr
    merchant_id: NonEmptyStr
    currency: Currency
    occurred_at: AwareDatetime

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return checked_currency(value)


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
LIFECYCLE_TAIL = """
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


def lifecycle_statement(*parts: str) -> str:
    """One lifecycle statement from constant fragments (values are bind parameters)."""
    return "".join(parts)


HOLD_CTE = """
hold AS (
    SELECT merchant_id, currency::text AS currency, amount, captured, released,
           release_event_id
      FROM ledger_holds
     WHERE payment_id = $3::text
),"""

PAYMENT_CTE = """
pay AS (
    SELECT merchant_id, captured, fees, refunded, fees_refunded, disputed
      FROM ledger_payments
     WHERE payment_id = $3::text AND currency = $6::text
),"""


_KNOWN_EVENTS = "SELECT event_id FROM ledger_transactions WHERE event_id = ANY($1::text[])"

_EVENT_ID_CONSTRAINT = "ledger_transactions_event_id_key"

_P = TypeVar("_P", bound=LifecyclePosting)


@dataclass(frozen=True, slots=True)
class PostingKind(Generic[_P]):
    """How one posting type becomes a statement's arguments."""

    kind: str
    sql: str
    accounts: Callable[[_P], tuple[AccountSpec, ...]]
    payment_id: Callable[[_P], str | None]
    reference: Callable[[_P], str | None]
    params: Callable[[_P, Callable[[AccountSpec], int]], tuple[object, ...]]


def _id_of(ids: dict[str, int], spec: AccountSpec) -> int:
    return ids[spec.code]


async def post_lifecycle(
    conn: asyncpg.Connection, kind: PostingKind[_P], postings: Sequence[_P]
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
                ids = await lock_accounts(conn, specs)
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


def no_payment(_posting: LifecyclePosting) -> None:
    return None
