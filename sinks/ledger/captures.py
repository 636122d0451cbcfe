"""Captures without a hold (kind ``capture``): a whole batch posted by one statement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Self

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

from schemas.money import MAX_AMOUNT_MINOR, Currency
from sinks.ledger.accounts import (
    AccountSpec,
    NonEmptyStr,
    checked_currency,
    fee_revenue_account,
    lock_accounts,
    merchant_wallet_account,
    psp_clearing_account,
)

CAPTURE_KIND = "capture"
"""``ledger_transactions.kind`` of a capture posting."""


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
        return checked_currency(value)

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
    async with conn.transaction():
        ids = await lock_accounts(conn, specs)
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
