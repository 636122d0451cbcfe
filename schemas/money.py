"""Money: an integer number of minor units and an ISO 4217 currency. Never a float."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from schemas.currencies import exponent

MAX_AMOUNT_MINOR = 10**12 - 1
"""Largest amount one command may carry, in minor units (bounded so sums fit in int64)."""

Currency = Annotated[str, Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")]
MinorUnits = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MINOR)]


class Money(BaseModel):
    """An amount in minor units of ``currency`` (cents for USD, yen for JPY, fils for KWD)."""

    model_config = ConfigDict(frozen=True, strict=True)

    amount: MinorUnits
    currency: Currency

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        exponent(value)  # raises UnknownCurrencyError (a ValueError) for unknown codes
        return value

    @classmethod
    def of(cls, amount: int, currency: str) -> Self:
        return cls(amount=amount, currency=currency)

    @classmethod
    def from_decimal(cls, major: Decimal | str, currency: str) -> Self:
        """Parse a major-unit amount ("12.34" USD); refuses digits the currency cannot hold."""
        value = Decimal(major)
        scaled = value.scaleb(exponent(currency))
        if scaled != scaled.to_integral_value():
            raise ValueError(
                f"{major} has more decimal places than {currency} allows "
                f"({exponent(currency)})"
            )
        return cls(amount=int(scaled), currency=currency)

    def to_decimal(self) -> Decimal:
        """The amount in major units, exactly."""
        return Decimal(self.amount).scaleb(-exponent(self.currency))

    def __str__(self) -> str:
        places = exponent(self.currency)
        return f"{self.to_decimal():.{places}f} {self.currency}"


def fee_for(amount: int, fee_bps: int, fee_fixed_minor: int) -> int:
    """Processing fee in minor units: ``fixed + amount * bps / 10000``.

    Rounding rule: the percentage part rounds half up to the nearest minor unit, using
    integers only. The fee never exceeds the amount, so a merchant is never owed a
    negative sum for a capture.
    """
    if amount < 0 or fee_bps < 0 or fee_fixed_minor < 0:
        raise ValueError("amount and fee terms must not be negative")
    percent_part = (amount * fee_bps + 5_000) // 10_000
    return min(amount, fee_fixed_minor + percent_part)
