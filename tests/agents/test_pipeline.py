"""End to end through the real stack: Kafka in, PSP sandbox, PostgreSQL ledger, HTTP out."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from schemas.dlq import DlqEnvelope
from schemas.money import fee_for
from sinks import ledger
from tests.agents.kafka_reader import TopicReader
from tests.conftest import async_wait_for
from topics.catalog import COMMANDS_DLQ, EVENTS

pytestmark = pytest.mark.stack


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def status_view(live: Settings, payment_id: str) -> tuple[int, dict[str, Any]]:
    url = f"http://{live.web_host}:{live.web_port}/v1/payments/{payment_id}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def events_for(
    reader: TopicReader, payment_id: str, count: int = 1, timeout: float = 30.0
) -> list[dict[str, Any]]:
    def found(_records: list[Any]) -> list[dict[str, Any]]:
        mine = [v for v in reader.values() if v["payment_id"] == payment_id]
        return mine if len(mine) >= count else []

    result: list[dict[str, Any]] = reader.until(found, timeout=timeout)
    return result


def sandbox_charges(live: Settings) -> list[dict[str, Any]]:
    """Ground truth of every sandbox PSP: every intent each one created."""
    charges: list[dict[str, Any]] = []
    for psp in live.psp_endpoints():
        with urllib.request.urlopen(f"{psp.url}/sandbox/charges", timeout=5) as r:  # noqa: S310
            body = json.loads(r.read())
        charges.extend(body["charges"] if isinstance(body, dict) else body)
    return charges


def command(payment_id: str, **fields: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "authorize_payment",
        "schema_version": 1,
        "command_id": unique("cmd"),
        "merchant_id": "m_test",
        "idempotency_key": f"{payment_id}-auth",
        "payment_id": payment_id,
        "created_at": datetime.now(UTC).isoformat(),
        "amount": 1000,
        "currency": "USD",
        "payment_method": "tok_visa",
        "capture_method": "automatic",
    }
    base.update(fields)
    return json.dumps(base).encode()


async def test_automatic_capture_posts_ledger_and_status(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    merchant = unique("m")
    payment = unique("pay")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="k1",
                     amount=12_345, currency="USD", payment_method="tok_visa")
    client.flush()

    [event] = events_for(events, payment)
    assert event["type"] == "payment.captured"
    assert event["status"] == "captured"
    assert event["amount_captured"] == 12_345
    # Routing by cost: above USD 25.00 beta (2.5% + 0.40) is cheaper than alpha (2.9% + 0.30).
    assert event["psp"] == "beta" and event["psp_reference"]
    assert [c["payment_id"] for c in sandbox_charges(live) if c.get("payment_id") == payment] == [
        payment
    ]

    fee = fee_for(12_345, live.fee_bps, live.fee_fixed_minor)
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def posted() -> Any:
            return await conn.fetchrow(
                "SELECT id FROM ledger_transactions WHERE payment_id = $1", payment
            )

        from tests.conftest import async_wait_for

        tx = await async_wait_for(posted)
        entries = await conn.fetch(
            "SELECT a.code, e.amount, e.currency FROM ledger_entries e "
            "JOIN ledger_accounts a ON a.id = e.account_id WHERE e.transaction_id = $1",
            tx["id"],
        )
        legs = {row["code"]: row["amount"] for row in entries}
        assert sum(legs.values()) == 0
        assert legs["platform:psp_clearing:USD"] == 12_345
        assert legs[f"merchant:{merchant}:available:USD"] == -(12_345 - fee)
        assert legs["platform:fee_revenue:USD"] == -fee
        wallet = await conn.fetchval(
            "SELECT balance FROM ledger_accounts WHERE code = $1",
            f"merchant:{merchant}:available:USD",
        )
        assert wallet == 12_345 - fee
    finally:
        await conn.close()

    code, body = status_view(live, payment)
    assert code == 200
    assert body["status"] == "captured" and body["payment_id"] == payment
    assert body["amount"] == 12_345 and body["currency"] == "USD"


async def test_manual_capture_partial_then_rest_is_refused(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    client.authorize(merchant_id="m_manual", payment_id=payment, idempotency_key="a",
                     amount=5_000, currency="EUR", payment_method="tok_mastercard",
                     capture_method="manual")
    client.capture(merchant_id="m_manual", payment_id=payment, idempotency_key="c1", amount=3_000)
    client.capture(merchant_id="m_manual", payment_id=payment, idempotency_key="c2", amount=3_000)
    client.flush()

    authorized, captured, refused = events_for(events, payment, count=3)
    assert authorized["type"] == "payment.authorized" and authorized["status"] == "authorized"
    assert captured["type"] == "payment.captured"
    assert captured["amount_captured"] == 3_000 and captured["amount_captured_now"] == 3_000
    assert refused["type"] == "payment.rejected"
    assert "cannot capture" in refused["reason"]
    assert refused["status"] == "captured"  # the rejection does not change the payment

    # The partial capture ended the authorization: the rest of the hold is released.
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def released() -> bool:
            return bool(await conn.fetchval(
                "SELECT release_event_id IS NOT NULL FROM ledger_holds WHERE payment_id = $1",
                payment,
            ))

        await async_wait_for(released, within=30)
        assert (await ledger.verify(conn)).ok
    finally:
        await conn.close()


def test_declined_token_gives_decline_code_and_no_ledger_entry(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    client.authorize(merchant_id="m_decl", payment_id=payment, idempotency_key="a",
                     amount=700, currency="USD",
                     payment_method="tok_chargeDeclinedInsufficientFunds")
    client.flush()
    [event] = events_for(events, payment)
    assert event["type"] == "payment.declined"
    assert event["decline_code"] == "insufficient_funds"
    assert event["amount_captured"] == 0


def test_same_key_same_payload_replays_and_charges_once(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    for _ in range(3):
        client.send_raw(payment.encode(), command(payment, idempotency_key="same"))
    client.flush()
    first, *replays = events_for(events, payment, count=3)
    assert first["replayed"] is False
    assert [r["replayed"] for r in replays] == [True, True]
    assert {r["event_id"] for r in replays} == {first["event_id"]}
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert len(charges) == 1


def test_same_key_different_amount_is_a_conflict(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    client.send_raw(payment.encode(), command(payment, idempotency_key="k", amount=1000))
    client.send_raw(payment.encode(), command(payment, idempotency_key="k", amount=2000))
    client.flush()
    original, conflict = events_for(events, payment, count=2)
    assert original["type"] == "payment.captured"
    assert conflict["type"] == "payment.rejected"
    assert conflict["reason"].startswith("idempotency_conflict")
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert [c["amount"] for c in charges] == [1000]


@pytest.mark.parametrize(
    ("fields", "reason_part"),
    [
        ({"currency": "XYZ"}, "unknown currency"),
        ({"amount": -5}, "amount"),
        ({"amount": 10.5}, "amount"),  # a fraction of a minor unit: too many decimals
        ({"currency": "JPY", "amount": 12.34}, "amount"),
        ({"payment_method": "4242424242424242"}, "card number"),
    ],
)
def test_invalid_business_fields_are_rejected_and_partition_keeps_flowing(
    live: Settings, client: PaymentsClient, events: TopicReader,
    fields: dict[str, Any], reason_part: str,
) -> None:
    payment = unique("pay")
    client.send_raw(payment.encode(), command(payment, **fields))
    # A valid command on the same key (same partition) right behind the bad one.
    client.send_raw(payment.encode(), command(payment, idempotency_key=f"{payment}-good"))
    client.flush()
    rejected, after = events_for(events, payment, count=2)
    assert rejected["type"] == "payment.rejected" and rejected["status"] == "rejected"
    assert reason_part in rejected["reason"]
    assert "4242424242424242" not in json.dumps(rejected)
    assert after["type"] == "payment.captured"


def test_unparseable_bytes_go_to_dlq_with_origin_and_partition_keeps_flowing(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    bad_values = [
        b"{not json",
        json.dumps({"type": "authorize_payment", "schema_version": 7}).encode(),
        json.dumps({"type": "authorize_payment", "schema_version": 1}).encode(),
    ]
    for value in bad_values:
        client.send_raw(payment.encode(), value)
    client.send_raw(payment.encode(), command(payment))
    client.flush()

    [after] = events_for(events, payment)
    assert after["type"] == "payment.captured"

    dlq = TopicReader(live.kafka_bootstrap_servers, COMMANDS_DLQ)
    try:
        mine = dlq.until(
            lambda records: [m for m in records if m.key() == payment.encode()]
            if len([m for m in records if m.key() == payment.encode()]) >= 3 else None
        )
    finally:
        dlq.close()
    assert [m.value() for m in mine] == bad_values
    envelopes = [DlqEnvelope.from_headers(m.headers()) for m in mine]
    assert [e.reason for e in envelopes] == [
        "invalid_json", "unknown_schema_version", "schema_violation"
    ]
    for envelope in envelopes:
        assert envelope.original_topic == "payments.commands"
        assert envelope.original_offset >= 0
        assert envelope.stage == "intake"


def test_status_view_unknown_payment_is_404(live: Settings) -> None:
    code, body = status_view(live, unique("nope"))
    assert code == 404
    assert body["error"] == "not_found"


def test_retryable_decline_retries_with_new_attempts_then_fails_without_charge(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    client.authorize(merchant_id="m_retry", payment_id=payment, idempotency_key="a",
                     amount=900, currency="USD",
                     payment_method="tok_chargeDeclinedProcessingError")
    client.flush()
    [event] = events_for(events, payment, timeout=90)
    assert event["type"] == "payment.failed"
    assert event["decline_code"] == "processing_error"
    assert event["reason"].startswith("retries_exhausted"), event
    intents = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    # One intent per attempt, each with its own idempotency key: three inline attempts
    # per try, and every retry from a tier is a fresh attempt (a retry under the same key
    # would only replay the PSP's recorded decline; issue 11, finding 8).
    tries = live.retry_max_attempts + 1
    assert len(intents) == 3 * tries
    assert len({c["idempotency_key"] for c in intents}) == 3 * tries
    assert all(c["amount_captured"] == 0 for c in intents)


async def test_poison_event_goes_to_events_dlq_and_sink_keeps_applying(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    from confluent_kafka import Producer

    from tests.conftest import async_wait_for
    from topics.catalog import EVENTS_DLQ

    payment = unique("pay")
    producer = Producer({"bootstrap.servers": live.kafka_bootstrap_servers})
    poison = json.dumps({"type": "payment.captured", "payment_id": payment}).encode()
    producer.produce(EVENTS, key=payment.encode(), value=poison)
    producer.flush(10)
    client.authorize(merchant_id="m_poison", payment_id=payment, idempotency_key="a",
                     amount=1500, currency="USD", payment_method="tok_visa")
    client.flush()

    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def applied() -> Any:
            return await conn.fetchval(
                "SELECT status FROM payment_status WHERE payment_id = $1", payment
            )

        assert await async_wait_for(applied) == "captured"
    finally:
        await conn.close()
    dlq = TopicReader(live.kafka_bootstrap_servers, EVENTS_DLQ)
    try:
        [record] = dlq.until(
            lambda records: [m for m in records if m.key() == payment.encode()] or None
        )
    finally:
        dlq.close()
    assert record.value() == poison
    envelope = DlqEnvelope.from_headers(record.headers())
    assert envelope.stage == "sink" and envelope.original_topic == EVENTS


async def test_manual_payment_holds_then_captures_against_the_hold(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    from tests.conftest import async_wait_for

    merchant = unique("m")
    payment = unique("pay")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=8_000, currency="USD", payment_method="tok_visa",
                     capture_method="manual")
    client.capture(merchant_id=merchant, payment_id=payment, idempotency_key="c", amount=5_000)
    client.flush()
    events_for(events, payment, count=2)
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def hold() -> Any:
            row = await conn.fetchrow(
                "SELECT amount, captured FROM ledger_holds WHERE payment_id = $1", payment
            )
            return row if row is not None and row["captured"] == 5_000 else None

        row = await async_wait_for(hold)
        assert row["amount"] == 8_000
        balances = await ledger.merchant_balances(conn, merchant)
        fee = fee_for(5_000, live.fee_bps, live.fee_fixed_minor)
        assert balances["USD"].available == 5_000 - fee
        # The partial capture ended the authorization: the rest of the hold (3,000) went
        # back in the same transaction as the capture.
        assert balances["USD"].pending == 0
        assert (await ledger.verify(conn)).ok
    finally:
        await conn.close()


def test_metrics_endpoint_exports_pipeline_metrics(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment = unique("pay")
    client.authorize(merchant_id="m_metrics", payment_id=payment, idempotency_key="a",
                     amount=1_000, currency="USD", payment_method="tok_visa")
    client.flush()
    events_for(events, payment)
    url = f"http://{live.web_host}:{live.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    assert 'paystream_commands_total{outcome="payment.captured",type="authorize_payment"}' in text
    assert "paystream_end_to_end_latency_seconds_bucket" in text
