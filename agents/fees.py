"""Merchant processing fees per merchant and currency, in the currency's own minor units.

A fixed fee of "30" means $0.30 in USD but ¥30 in JPY and 0.030 KWD: one number in minor
units cannot serve every currency. The schedule is:

1. the merchant's own terms for the currency (the ``merchant_fees`` table, maintained with
   ``sinks.ledger.set_merchant_fee``), else
2. the per-currency default (:data:`DEFAULT_FIXED_FEE_MINOR`, or the settings' fixed fee
   scaled by the currency's exponent for a currency not listed), with the default basis
   points.

The command processor reads the table into memory (:meth:`FeeSchedule.refresh`, at start and
on a timer), so computing a fee costs no I/O on the money path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from schemas.currencies import exponent
from schemas.money import fee_for

DEFAULT_FIXED_FEE_MINOR: Mapping[str, int] = {
    "USD": 30, "EUR": 25, "GBP": 20, "CAD": 30, "AUD": 30, "CHF": 30,
    "JPY": 30, "KRW": 300, "KWD": 100, "BHD": 100, "OMR": 100,
}
"""Per-currency default fixed fee, in that currency's minor units (¥30, 0.100 KWD)."""


@dataclass(frozen=True)
class FeeTerms:
    fee_bps: int
    fee_fixed_minor: int


class FeeSchedule:
    """Fee terms by merchant and currency, with per-currency defaults."""

    def __init__(self, default_bps: int, default_fixed_usd_cents: int) -> None:
        self._default_bps = default_bps
        self._default_fixed = default_fixed_usd_cents
        self._terms: dict[tuple[str, str], FeeTerms] = {}

    def default_fixed(self, currency: str) -> int:
        """The default fixed fee for ``currency`` in its minor units."""
        listed = DEFAULT_FIXED_FEE_MINOR.get(currency)
        if listed is not None:
            return listed
        scale = exponent(currency) - 2  # the setting is in cents (exponent 2)
        if scale >= 0:
            return int(self._default_fixed * 10**scale)
        return int(self._default_fixed // 10 ** (-scale))

    def terms(self, merchant_id: str, currency: str) -> FeeTerms:
        own = self._terms.get((merchant_id, currency))
        if own is not None:
            return own
        return FeeTerms(self._default_bps, self.default_fixed(currency))

    def fee(self, merchant_id: str, currency: str | None, amount: int) -> int:
        """The fee for capturing ``amount`` minor units of ``currency`` for the merchant."""
        if currency is None:
            raise ValueError("a fee needs the payment's currency")
        terms = self.terms(merchant_id, currency)
        return fee_for(amount, terms.fee_bps, terms.fee_fixed_minor)

    def set_terms(self, merchant_id: str, currency: str, terms: FeeTerms) -> None:
        self._terms[(merchant_id, currency)] = terms

    async def refresh(self, pool: asyncpg.Pool) -> int:
        """Reload every merchant's terms from ``merchant_fees``; returns how many."""
        async with pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT merchant_id, currency, fee_bps, fee_fixed_minor FROM merchant_fees"
            )
        self._terms = {
            (r["merchant_id"], r["currency"]): FeeTerms(r["fee_bps"], r["fee_fixed_minor"])
            for r in rows
        }
        return len(self._terms)
