"""A card number anywhere in a command: rejected without echo, or dead-lettered scrubbed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from schemas.dlq import DlqEnvelope
from schemas.pan import looks_like_pan
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_pipeline import command, events_for, sandbox_charges, unique
from topics.catalog import COMMANDS_DLQ

pytestmark = pytest.mark.stack

PAN = "4000056655665556"  # Luhn-valid test Visa debit


def test_card_numbers_never_pass_intake_and_never_leave_it(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    by_customer = unique("pay_pan_cus")
    by_metadata_key = unique("pay_pan_key")
    by_refund_reason = unique("pay_pan_refund")
    carrier = f"pay_{PAN}"  # the payment id itself carries the number
    client.send_raw(by_customer.encode(), command(by_customer, customer_id=f"cus_{PAN}"))
    client.send_raw(by_metadata_key.encode(),
                    command(by_metadata_key, metadata={f"card {PAN}": "x"}))
    client.send_raw(by_refund_reason.encode(), command(
        by_refund_reason, type="refund_payment", refund_id="re_1", reason=f"{PAN} asked"
    ))
    client.send_raw(carrier.encode(), command(carrier, description="fine"))
    client.flush()

    for payment, field in ((by_customer, "customer_id"), (by_metadata_key, "metadata.<key>"),
                           (by_refund_reason, "reason")):
        [event] = events_for(events, payment)
        assert event["type"] == "payment.rejected", event
        assert f"a card number (PAN) in {field}" in event["reason"]
        assert not looks_like_pan(json.dumps(event))

    dlq = TopicReader(live.kafka_bootstrap_servers, COMMANDS_DLQ)
    try:
        def parked(records: list[Any]) -> list[Any]:
            return [r for r in records
                    if dict(r.headers() or []).get("dlq.reason") == b"card_number"
                    and b"[PAN REDACTED]" in (r.value() or b"")]

        [record] = dlq.until(parked)
    finally:
        dlq.close()
    assert record.key() == b"pay_[PAN REDACTED]"
    assert not looks_like_pan(record.value().decode())
    assert not any(looks_like_pan(f"{k}={v.decode()}") for k, v in record.headers())
    envelope = DlqEnvelope.from_headers(record.headers())
    assert envelope.stage == "intake" and "payment_id" in envelope.error_message

    events.poll()
    assert not [v for v in events.values() if PAN in json.dumps(v)]
    assert not [c for c in sandbox_charges(live)
                if c.get("payment_id") in {by_customer, by_metadata_key, carrier}]
