"""Disputes (chargebacks) of captured payments (kind ``dispute``)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sinks.ledger.accounts import (
    NonEmptyStr,
    PositiveAmount,
    merchant_receivable_account,
    merchant_wallet_account,
    psp_clearing_account,
)
from sinks.ledger.lifecycle import (
    LIFECYCLE_TAIL,
    PAYMENT_CTE,
    LifecyclePosting,
    PostingKind,
    PostingResult,
    lifecycle_statement,
    post_lifecycle,
)

DISPUTE_KIND = "dispute"


class DisputePosting(LifecyclePosting):
    """A chargeback of ``amount`` on a captured payment."""

    payment_id: NonEmptyStr
    dispute_id: NonEmptyStr
    amount: PositiveAmount


# $8 amount, $9 clearing, $10 wallet, $11 merchant receivable
_DISPUTE = lifecycle_statement(
    "WITH",
    PAYMENT_CTE,
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
    LIFECYCLE_TAIL,
)


_DISPUTE_KIND: PostingKind[DisputePosting] = PostingKind(
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


async def post_disputes(
    conn: asyncpg.Connection, postings: Sequence[DisputePosting]
) -> PostingResult:
    """Chargebacks: debit the merchant's wallet, the excess to its receivable account.

    Rejected: ``unknown_payment``, ``merchant_mismatch``, ``dispute_exceeds_captured``.
    """
    return await post_lifecycle(conn, _DISPUTE_KIND, postings)
