"""Merchant fee terms (``merchant_fees``): what a capture's fee is computed from."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from schemas.money import fee_for
from sinks.ledger.accounts import checked_currency


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
        checked_currency(currency),
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
