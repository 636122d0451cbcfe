"""Refunds of captured payments (kind ``refund``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import asyncpg
from pydantic import model_validator

from sinks.ledger.accounts import (
    NonEmptyStr,
    NonNegativeAmount,
    PositiveAmount,
    fee_revenue_account,
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

REFUND_KIND = "refund"


class RefundPosting(LifecyclePosting):
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


# $8 amount, $9 fee refund, $10 clearing, $11 wallet, $12 fee revenue
_REFUND = lifecycle_statement(
    "WITH",
    PAYMENT_CTE,
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
    LIFECYCLE_TAIL,
)


_REFUND_KIND: PostingKind[RefundPosting] = PostingKind(
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
    return await post_lifecycle(conn, _REFUND_KIND, postings)
