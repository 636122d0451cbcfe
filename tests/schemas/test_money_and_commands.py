"""Pure logic: money, currencies, PAN detection, command intake classification."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agents.intake import Accepted, DeadLetter, Rejected, fingerprint, parse_command
from schemas.currencies import exponent
from schemas.money import Money, fee_for
from schemas.pan import looks_like_pan, scrub_pans


def test_exponents_follow_iso_4217() -> None:
    assert (exponent("JPY"), exponent("USD"), exponent("KWD")) == (0, 2, 3)


def test_money_refuses_floats_and_unknown_currencies() -> None:
    with pytest.raises(ValidationError):
        Money(amount=10.5, currency="USD")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unknown currency"):
        Money.of(100, "ABC")
    with pytest.raises(ValidationError):
        Money.of(-1, "USD")


def test_from_decimal_refuses_digits_the_currency_cannot_hold() -> None:
    assert Money.from_decimal("12.34", "USD").amount == 1234
    assert Money.from_decimal("1.234", "KWD").amount == 1234
    with pytest.raises(ValueError, match="decimal places"):
        Money.from_decimal("12.5", "JPY")
    with pytest.raises(ValueError, match="decimal places"):
        Money.from_decimal("1.001", "USD")
    assert str(Money.of(1234, "KWD")) == "1.234 KWD"


@given(amount=st.integers(0, 10**12), bps=st.integers(0, 10_000), fixed=st.integers(0, 10_000))
def test_fee_is_bounded_by_the_amount_and_rounds_half_up(amount: int, bps: int, fixed: int) -> None:
    fee = fee_for(amount, bps, fixed)
    assert 0 <= fee <= amount
    exact = Decimal(amount) * bps / 10_000
    expected = min(amount, fixed + int((exact + Decimal("0.5")).to_integral_value("ROUND_FLOOR")))
    assert fee == expected


def test_pan_detection_uses_luhn() -> None:
    assert looks_like_pan("card 4242 4242 4242 4242")
    assert looks_like_pan("4000-0566-5566-5556")
    assert not looks_like_pan("order 4242424242424241")  # fails Luhn
    assert not looks_like_pan("tok_visa")
    assert scrub_pans("x 4242424242424242 y") == "x [PAN REDACTED] y"


def command(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "authorize_payment",
        "schema_version": 1,
        "command_id": "cmd_1",
        "merchant_id": "m_1",
        "idempotency_key": "k_1",
        "payment_id": "pay_1",
        "created_at": datetime.now(UTC).isoformat(),
        "amount": 1000,
        "currency": "USD",
        "payment_method": "tok_visa",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{oops", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b"\xff\xfe", "invalid_json"),
        (command(schema_version=2), "unknown_schema_version"),
        (command(type="teleport_payment"), "schema_violation"),
        (command(payment_id=None), "schema_violation"),
        (command(created_at="2026-11-21T10:00:00"), "schema_violation"),  # no zone
    ],
)
def test_unaddressable_input_is_dead_lettered(raw: bytes, reason: str) -> None:
    verdict = parse_command(raw)
    assert isinstance(verdict, DeadLetter)
    assert verdict.reason == reason


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"currency": "usd"}, "currency"),
        ({"currency": "XXQ"}, "unknown currency"),
        ({"amount": -1}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": 10.5}, "amount"),
        ({"amount": "1000"}, "amount"),
        ({"capture_method": "later"}, "capture_method"),
        ({"payment_method": "4242424242424242"}, "card number"),
        ({"metadata": {"note": "card 4242 4242 4242 4242"}}, "card number"),
    ],
)
def test_invalid_business_fields_are_rejected_with_reason(
    fields: dict[str, Any], fragment: str
) -> None:
    verdict = parse_command(command(**fields))
    assert isinstance(verdict, Rejected)
    assert fragment in verdict.reason
    assert "4242" not in verdict.reason


def test_fingerprint_ignores_command_id_and_created_at_only() -> None:
    first = parse_command(command(command_id="a", created_at="2026-01-01T00:00:00Z"))
    retry = parse_command(command(command_id="b", created_at="2026-01-02T00:00:00+02:00"))
    other = parse_command(command(amount=1001))
    assert isinstance(first, Accepted)
    assert isinstance(retry, Accepted)
    assert isinstance(other, Accepted)
    assert first.fingerprint == retry.fingerprint == fingerprint(first.command)
    assert other.fingerprint != first.fingerprint
