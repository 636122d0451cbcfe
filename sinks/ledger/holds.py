"""Two-phase transfers: authorization holds, captures against them, and releases (voids
and expiries)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, Self

import asyncpg
from pydantic import model_validator

from sinks.ledger.accounts import (
    NonEmptyStr,
    NonNegativeAmount,
    PositiveAmount,
    fee_revenue_account,
    merchant_pending_account,
    merchant_wallet_account,
    psp_clearing_account,
    psp_pending_account,
)
from sinks.ledger.lifecycle import (
    HOLD_CTE,
    LIFECYCLE_TAIL,
    PAYMENT_CTE,
    LifecyclePosting,
    PostingKind,
    PostingResult,
    lifecycle_statement,
    no_payment,
    post_lifecycle,
)

AUTHORIZATION_KIND = "authorization"
HOLD_CAPTURE_KIND = "hold_capture"
HOLD_RELEASE_KIND = "hold_release"


class AuthorizationHold(LifecyclePosting):
    """Phase one: hold ``amount`` of an authorized payment (kind ``authorization``)."""

    payment_id: NonEmptyStr
    amount: PositiveAmount


class HoldCapture(LifecyclePosting):
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


class HoldRelease(LifecyclePosting):
    """Release the whole remainder of the payment's hold (a void, or an expiry)."""

    payment_id: NonEmptyStr
    reason: ReleaseReason = "void"


# $8 amount, $9 psp pending, $10 merchant pending
_AUTHORIZE = lifecycle_statement(
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
    LIFECYCLE_TAIL,
)

# $8 amount, $9 fee, $10 psp pending, $11 merchant pending, $12 clearing, $13 wallet,
# $14 fee revenue
_HOLD_CAPTURE = lifecycle_statement(
    "WITH",
    HOLD_CTE,
    PAYMENT_CTE,
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
    LIFECYCLE_TAIL,
)

# $8 release reason, $9 psp pending, $10 merchant pending
_RELEASE = lifecycle_statement(
    "WITH",
    HOLD_CTE,
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
    LIFECYCLE_TAIL,
)


_AUTHORIZE_KIND: PostingKind[AuthorizationHold] = PostingKind(
    kind=AUTHORIZATION_KIND,
    sql=_AUTHORIZE,
    accounts=lambda p: (
        psp_pending_account(p.currency),
        merchant_pending_account(p.merchant_id, p.currency),
    ),
    payment_id=lambda p: p.payment_id,
    reference=no_payment,
    params=lambda p, acc: (
        p.amount,
        acc(psp_pending_account(p.currency)),
        acc(merchant_pending_account(p.merchant_id, p.currency)),
    ),
)

_HOLD_CAPTURE_KIND: PostingKind[HoldCapture] = PostingKind(
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
    reference=no_payment,
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

_RELEASE_KIND: PostingKind[HoldRelease] = PostingKind(
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


async def post_authorizations(
    conn: asyncpg.Connection, postings: Sequence[AuthorizationHold]
) -> PostingResult:
    """Place pending holds (phase one of a two-phase transfer); one hold per payment.

    Rejected: ``hold_exists`` (the payment already has a hold, under another event id).
    Like every lifecycle function: one database transaction (a savepoint inside the
    caller's), idempotent on ``event_id`` (known ids are listed in ``duplicates``), and a
    refused posting is rejected with its reason, never raised.
    """
    return await post_lifecycle(conn, _AUTHORIZE_KIND, postings)


async def post_hold_captures(
    conn: asyncpg.Connection, postings: Sequence[HoldCapture]
) -> PostingResult:
    """Capture against holds, fully or partly, several times up to the held amount.

    Rejected: ``unknown_hold``, ``hold_mismatch`` (other merchant or currency),
    ``hold_released`` (voided or expired), ``capture_exceeds_hold``, ``merchant_mismatch``.
    """
    return await post_lifecycle(conn, _HOLD_CAPTURE_KIND, postings)


async def release_holds(conn: asyncpg.Connection, postings: Sequence[HoldRelease]) -> PostingResult:
    """Void or expire holds: release each hold's whole remainder, at most once.

    Rejected: ``unknown_hold``, ``hold_mismatch``, ``hold_released`` (a second release),
    ``hold_fully_captured`` (nothing left to release).
    """
    return await post_lifecycle(conn, _RELEASE_KIND, postings)


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
