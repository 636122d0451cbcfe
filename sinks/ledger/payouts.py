"""Payouts from a merchant's available wallet to its bank (kind ``payout``)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from sinks.ledger.accounts import (
    NonEmptyStr,
    PositiveAmount,
    bank_payouts_account,
    merchant_wallet_account,
)
from sinks.ledger.lifecycle import (
    LIFECYCLE_TAIL,
    LifecyclePosting,
    PostingKind,
    PostingResult,
    lifecycle_statement,
    no_payment,
    post_lifecycle,
)

PAYOUT_KIND = "payout"


class PayoutPosting(LifecyclePosting):
    """Pay ``amount`` of the merchant's available wallet out to its bank."""

    payout_id: NonEmptyStr
    amount: PositiveAmount


# $8 amount, $9 wallet, $10 bank payouts
_PAYOUT = lifecycle_statement(
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
    LIFECYCLE_TAIL,
)


_PAYOUT_KIND: PostingKind[PayoutPosting] = PostingKind(
    kind=PAYOUT_KIND,
    sql=_PAYOUT,
    accounts=lambda p: (
        merchant_wallet_account(p.merchant_id, p.currency),
        bank_payouts_account(p.currency),
    ),
    payment_id=no_payment,
    reference=lambda p: p.payout_id,
    params=lambda p, acc: (
        p.amount,
        acc(merchant_wallet_account(p.merchant_id, p.currency)),
        acc(bank_payouts_account(p.currency)),
    ),
)


async def post_payouts(
    conn: asyncpg.Connection, postings: Sequence[PayoutPosting]
) -> PostingResult:
    """Move available merchant funds to ``platform:bank_payouts:<CUR>``.

    Rejected: ``insufficient_funds`` when the wallet would go below zero.
    """
    return await post_lifecycle(conn, _PAYOUT_KIND, postings)
