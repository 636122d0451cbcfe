"""ISO 4217 currencies and their minor-unit exponents.

The table holds the active ISO 4217 codes a card PSP settles in. The exponent is the
number of decimal places of the minor unit: JPY 0 (1 yen), USD 2 (1 cent), KWD 3 (1 fils).
"""

from __future__ import annotations

from typing import Final

# Exponents that differ from the common value 2.
_EXPONENT_0: Final = frozenset(
    "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split()
)
_EXPONENT_3: Final = frozenset("BHD IQD JOD KWD LYD OMR TND".split())
_EXPONENT_2: Final = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
    GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT
    LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN
    NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP
    SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VES
    WST XCD YER ZAR ZMW ZWL
    """.split()
)

CURRENCY_EXPONENTS: Final[dict[str, int]] = {
    **{code: 0 for code in _EXPONENT_0},
    **{code: 2 for code in _EXPONENT_2},
    **{code: 3 for code in _EXPONENT_3},
}


class UnknownCurrencyError(ValueError):
    """The code is not an ISO 4217 currency this system settles in."""


def exponent(currency: str) -> int:
    """The minor-unit exponent of ``currency`` (upper-case ISO 4217 code)."""
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrencyError(
            f"unknown currency {currency!r}: expected an upper-case ISO 4217 code such as USD"
        ) from None
