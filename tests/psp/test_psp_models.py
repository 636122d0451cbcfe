"""Protocol models, decline classification, and sandbox money rules (property-based)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from psp.declines import classify, is_retryable
from psp.protocol import AuthorizeRequest, PspResult
from psp.sandbox.state import ApiError, FaultConfig, SandboxState

VALID = {
    "attempt_id": "att_1",
    "payment_id": "pay_1",
    "merchant_id": "m_1",
    "amount": 100,
    "currency": "USD",
    "payment_method": "tok_visa",
    "capture_method": "manual",
}


@pytest.mark.parametrize(
    "code", ["processing_error", "rate_limit", "try_again_later", "api_error", " Processing_Error "]
)
def test_retryable_codes(code: str) -> None:
    assert is_retryable(code)
    assert classify(code) == "retryable"


@pytest.mark.parametrize(
    "code",
    [
        "generic_decline",
        "card_declined",
        "insufficient_funds",
        "lost_card",
        "stolen_card",
        "expired_card",
        "incorrect_cvc",
        "never_heard_of_it",
    ],
)
def test_final_codes(code: str) -> None:
    assert not is_retryable(code)
    assert classify(code) == "final"


def test_authorize_request_accepts_valid() -> None:
    req = AuthorizeRequest.model_validate(VALID)
    assert req.amount == 100


@pytest.mark.parametrize(
    "patch",
    [
        {"amount": 10.0},
        {"amount": "100"},
        {"amount": 0},
        {"currency": "usd"},
        {"capture_method": "later"},
        {"attempt_id": ""},
        {"extra": 1},
    ],
)
def test_authorize_request_rejects(patch: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuthorizeRequest.model_validate({**VALID, **patch})


def test_result_rejects_float_money() -> None:
    with pytest.raises(ValidationError):
        PspResult.model_validate({"outcome": "succeeded", "psp": "a", "amount_captured": 1.5})
    with pytest.raises(ValidationError):
        PspResult.model_validate({"outcome": "failed", "psp": "a"})


def _state() -> SandboxState:
    return SandboxState(
        name="t",
        api_key="k",
        webhook_secret="w",
        faults=FaultConfig(),
        timeout_hold_s=0.0,
        rng=random.Random(0),
    )


@given(
    amount=st.integers(min_value=1, max_value=10_000),
    capture=st.one_of(st.none(), st.integers(min_value=1, max_value=10_000)),
    refunds=st.lists(st.one_of(st.none(), st.integers(min_value=1, max_value=10_000)), max_size=8),
)
def test_refunds_never_exceed_captured(
    amount: int, capture: int | None, refunds: list[int | None]
) -> None:
    state = _state()
    pi = state.create_intent(
        amount=amount,
        currency="usd",
        payment_method="tok_visa",
        capture_method="manual",
        metadata={},
        idempotency_key=None,
    )
    try:
        state.capture(pi.id, capture)
    except ApiError:
        assert capture is not None and capture > amount
        return
    received = pi.amount_received
    assert received == (amount if capture is None else capture)
    refunded = 0
    for value in refunds:
        try:
            refund, _ = state.refund(pi.id, value, None)
        except ApiError:
            assert value is None or value > received - refunded or refunded == received
            continue
        refunded += refund.amount
        assert pi.amount_refunded == refunded <= received
