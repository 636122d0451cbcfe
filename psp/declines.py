"""Decline-code classification: may a declined PSP call be tried again, or is it final?

Codes follow Stripe's vocabulary (``decline_code`` of a card error, or the error ``code``
when no decline code is given). Anything not known to be retryable is final: retrying a
final decline annoys issuers and customers, so the safe default is "do not retry".
"""

from __future__ import annotations

from typing import Literal

RETRYABLE_CODES: frozenset[str] = frozenset(
    {
        "processing_error",
        "rate_limit",
        "try_again_later",
        "api_error",
        "issuer_not_available",
        "reenter_transaction",
        "approve_with_id",
    }
)
"""Temporary failures: the same payment may succeed if tried again later."""

FINAL_CODES: frozenset[str] = frozenset(
    {
        "generic_decline",
        "card_declined",
        "insufficient_funds",
        "lost_card",
        "stolen_card",
        "expired_card",
        "incorrect_cvc",
        "incorrect_number",
        "incorrect_zip",
        "invalid_cvc",
        "invalid_expiry_month",
        "invalid_expiry_year",
        "invalid_number",
        "invalid_account",
        "invalid_amount",
        "card_not_supported",
        "card_velocity_exceeded",
        "currency_not_supported",
        "do_not_honor",
        "do_not_try_again",
        "fraudulent",
        "merchant_blacklist",
        "pickup_card",
        "restricted_card",
        "security_violation",
        "service_not_allowed",
        "stop_payment_order",
        "transaction_not_allowed",
        "withdrawal_count_limit_exceeded",
        "authentication_required",
    }
)
"""Known final declines (informational; every code not in :data:`RETRYABLE_CODES` is final)."""

DeclineClass = Literal["retryable", "final"]


def _normalize(code: str) -> str:
    return code.strip().lower()


def is_retryable(code: str) -> bool:
    """True when a decline with this code may be retried; unknown codes are final."""
    return _normalize(code) in RETRYABLE_CODES


def classify(code: str) -> DeclineClass:
    """``"retryable"`` or ``"final"`` for a decline code (see :func:`is_retryable`)."""
    return "retryable" if is_retryable(code) else "final"
