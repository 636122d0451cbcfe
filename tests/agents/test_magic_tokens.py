"""Every sandbox magic token through the whole pipeline: the event and decline code."""

from __future__ import annotations

import uuid

import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from tests.agents.kafka_reader import TopicReader
from topics.catalog import EVENTS

pytestmark = pytest.mark.stack

EXPECTED: dict[str, tuple[str, str | None]] = {
    "tok_visa": ("payment.captured", None),
    "tok_mastercard": ("payment.captured", None),
    "tok_chargeDeclined": ("payment.declined", "generic_decline"),
    "tok_chargeDeclinedInsufficientFunds": ("payment.declined", "insufficient_funds"),
    "tok_chargeDeclinedLostCard": ("payment.declined", "lost_card"),
    "tok_chargeDeclinedStolenCard": ("payment.declined", "stolen_card"),
    "tok_chargeDeclinedExpiredCard": ("payment.declined", "expired_card"),
    "tok_chargeDeclinedIncorrectCvc": ("payment.declined", "incorrect_cvc"),
    "tok_chargeDeclinedProcessingError": ("payment.failed", "processing_error"),
    "tok_threeDSecureRequired": ("payment.requires_action", None),
    "tok_createDispute": ("payment.captured", None),
    "tok_refundFail": ("payment.captured", None),
}


def test_each_magic_token_gives_its_event_and_decline_code(live: Settings) -> None:
    run = uuid.uuid4().hex[:8]
    payment_of = {token: f"pay_tok_{run}_{n}" for n, token in enumerate(EXPECTED)}
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        for token, payment in payment_of.items():
            client.authorize(merchant_id="m_tokens", payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=2_500, currency="USD",
                             payment_method=token)
    reader = TopicReader(live.kafka_bootstrap_servers, EVENTS)
    try:
        wanted = set(payment_of.values())

        def all_seen(_records: object) -> dict[str, dict[str, object]]:
            seen = {v["payment_id"]: v for v in reader.values() if v["payment_id"] in wanted}
            return seen if len(seen) == len(wanted) else {}

        seen = reader.until(all_seen, timeout=60)
    finally:
        reader.close()
    outcome = {
        token: (seen[payment]["type"], seen[payment]["decline_code"])
        for token, payment in payment_of.items()
    }
    assert outcome == EXPECTED
