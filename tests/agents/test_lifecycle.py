"""Void, refund, expiry, merchant-wide idempotency and retry tiers, end to end.

Real stack: commands through Tansu, the sandbox PSPs over HTTP, the ledger in PostgreSQL.
"""

from __future__ import annotations

import json
import re
import urllib.request
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from schemas.dlq import DlqEnvelope
from sinks import ledger
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_pipeline import events_for, sandbox_charges, unique
from tests.conftest import wait_for
from topics.catalog import COMMANDS_DLQ

pytestmark = pytest.mark.stack


def set_faults(live: Settings, **knobs: float) -> None:
    for psp in live.psp_endpoints():
        request = urllib.request.Request(  # noqa: S310 - local sandbox
            f"{psp.url}/sandbox/faults", data=json.dumps(knobs).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            assert response.status == 200


def metric_total(live: Settings, name: str, **labels: str) -> float:
    url = f"http://{live.web_host}:{live.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def ledger_rows(live: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def assert_ledger_verifies(live: Settings) -> None:
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        report = await ledger.verify(conn)
        assert report.ok, report
    finally:
        await conn.close()


async def test_void_releases_the_hold_and_later_commands_are_refused(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment, merchant = unique("pay"), unique("m")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=4_000, currency="EUR", payment_method="tok_visa",
                     capture_method="manual")
    client.void(merchant_id=merchant, payment_id=payment, idempotency_key="v")
    client.void(merchant_id=merchant, payment_id=payment, idempotency_key="v")  # a replay
    client.capture(merchant_id=merchant, payment_id=payment, idempotency_key="c")
    client.flush()
    authorized, canceled, replay, refused = events_for(events, payment, count=4)
    assert authorized["type"] == "payment.authorized"
    assert canceled["type"] == "payment.canceled" and canceled["status"] == "canceled"
    assert replay["event_id"] == canceled["event_id"] and replay["replayed"] is True
    assert refused["type"] == "payment.rejected" and refused["status"] == "canceled"
    assert "cannot capture" in refused["reason"]

    rows = await _wait_rows(
        live, "SELECT release_event_id FROM ledger_holds WHERE payment_id = $1 "
        "AND release_event_id IS NOT NULL", payment,
    )
    assert rows[0]["release_event_id"] == canceled["event_id"]
    await assert_ledger_verifies(live)


async def _wait_rows(live: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    from tests.conftest import async_wait_for

    async def found() -> list[asyncpg.Record]:
        return await ledger_rows(live, sql, *args)

    result: list[asyncpg.Record] = await async_wait_for(found, within=30)
    return result


async def test_partial_refunds_then_over_refund_is_refused(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment, merchant = unique("pay"), unique("m")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=10_000, currency="USD", payment_method="tok_visa")
    client.refund(merchant_id=merchant, payment_id=payment, idempotency_key="r1",
                  refund_id="re_1", amount=3_000)
    client.refund(merchant_id=merchant, payment_id=payment, idempotency_key="r2",
                  refund_id="re_2", amount=8_000)  # more than is left: refused
    client.refund(merchant_id=merchant, payment_id=payment, idempotency_key="r3",
                  refund_id="re_3")  # the rest
    client.void(merchant_id=merchant, payment_id=payment, idempotency_key="v")
    client.flush()
    captured, first, too_much, rest, void = events_for(events, payment, count=5)
    assert captured["type"] == "payment.captured"
    assert first["type"] == "payment.refunded" and first["status"] == "partially_refunded"
    assert first["amount_refunded"] == 3_000 and first["refund_id"] == "re_1"
    assert too_much["type"] == "payment.rejected" and "only 7000" in too_much["reason"]
    assert rest["type"] == "payment.refunded" and rest["status"] == "refunded"
    assert rest["amount_refunded"] == 10_000 and rest["amount_refunded_now"] == 7_000
    assert void["type"] == "payment.rejected" and "refund it" in void["reason"]
    rows = await _wait_rows(
        live, "SELECT count(*) AS n FROM ledger_transactions WHERE payment_id = $1 "
        "AND kind = 'refund' HAVING count(*) = 2", payment,
    )
    assert rows[0]["n"] == 2
    await assert_ledger_verifies(live)
    charge = next(c for c in sandbox_charges(live) if c.get("payment_id") == payment)
    assert charge["amount_refunded"] == 10_000


def test_same_key_for_another_payment_is_a_conflict_and_charges_nothing(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    merchant = unique("m")
    first, second = unique("pay"), unique("pay")
    client.authorize(merchant_id=merchant, payment_id=first, idempotency_key="order-1",
                     amount=1_500, currency="USD", payment_method="tok_visa")
    client.flush()
    assert events_for(events, first)[0]["type"] == "payment.captured"
    client.authorize(merchant_id=merchant, payment_id=second, idempotency_key="order-1",
                     amount=1_500, currency="USD", payment_method="tok_visa")
    client.flush()
    (conflict,) = events_for(events, second)
    assert conflict["type"] == "payment.rejected"
    assert conflict["reason"].startswith("idempotency_conflict")
    assert not [c for c in sandbox_charges(live) if c.get("payment_id") == second]


def test_uncaptured_authorization_expires_and_its_hold_is_released(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment, merchant = unique("pay"), unique("m")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=2_000, currency="EUR", payment_method="tok_visa",
                     capture_method="manual")
    client.flush()
    (authorized,) = events_for(events, payment)
    assert authorized["type"] == "payment.authorized"

    def expired(_records: object) -> dict[str, Any] | None:
        mine = [v for v in events.values() if v["payment_id"] == payment]
        return mine[-1] if mine[-1]["type"] == "payment.canceled" else None

    canceled = events.until(expired, timeout=live.authorization_validity_seconds + 30)
    assert canceled["reason"] == "authorization_expired"
    charge = next(c for c in sandbox_charges(live) if c.get("payment_id") == payment)
    assert charge["status"] == "canceled"


async def test_transient_psp_refusal_is_retried_from_a_tier_and_charges_once(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    """429 at every PSP: refused before processing, so the command waits in a retry tier."""
    before = metric_total(live, "paystream_retries_total", kind="command")
    set_faults(live, rate_limit_rate=1.0)
    try:
        payment, merchant = unique("pay"), unique("m")
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                         amount=3_300, currency="USD", payment_method="tok_visa")
        client.flush()
        wait_for(lambda: metric_total(live, "paystream_retries_total", kind="command") > before)
        assert not [v for v in events.values() if v["payment_id"] == payment]
    finally:
        set_faults(live, rate_limit_rate=0.0)
    (captured,) = events_for(events, payment)
    assert captured["type"] == "payment.captured"
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert len(charges) == 1 and charges[0]["amount"] == 3_300


async def test_5xx_after_every_inline_retry_is_verified_never_failed(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    """Finding 5 of issue 11: a 5xx may have been processed, so it is an unknown outcome.

    The payment waits in pending_verification while the PSP keeps answering 5xx (the
    resolver re-sends the same attempt, never taking a failed lookup for an answer), and
    is captured, once, when the PSP recovers.
    """
    set_faults(live, error_rate=1.0)
    try:
        payment, merchant = unique("pay"), unique("m")
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                         amount=3_350, currency="USD", payment_method="tok_visa")
        client.flush()
        events.until(lambda _r: any(v["payment_id"] == payment for v in events.values()),
                     timeout=30)
        (pending,) = [v for v in events.values() if v["payment_id"] == payment]
        assert pending["type"] == "payment.pending_verification", pending
    finally:
        set_faults(live, error_rate=0.0)

    def settled(_records: object) -> bool:
        return any(v["payment_id"] == payment and v["type"] != "payment.pending_verification"
                   for v in events.values())

    events.until(settled, timeout=60)
    types = [v["type"] for v in events.values() if v["payment_id"] == payment]
    assert types == ["payment.pending_verification", "payment.captured"], types
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert len(charges) == 1 and charges[0]["amount"] == 3_350


def test_retries_exhausted_fail_the_payment_and_park_the_command(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    set_faults(live, rate_limit_rate=1.0)
    dlq = TopicReader(live.kafka_bootstrap_servers, COMMANDS_DLQ)
    try:
        payment, merchant = unique("pay"), unique("m")
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                         amount=3_400, currency="USD", payment_method="tok_visa")
        client.flush()
        (failed,) = events_for(events, payment, timeout=120)
        assert failed["type"] == "payment.failed" and failed["status"] == "failed"
        assert failed["reason"].startswith("retries_exhausted")

        def parked(_records: object) -> DlqEnvelope | None:
            for record in dlq.records:
                if record.key() == payment.encode():
                    return DlqEnvelope.from_headers(record.headers())
            return None

        envelope = dlq.until(parked, timeout=30)
        assert envelope.reason == "retries_exhausted" and envelope.stage == "executor"
        assert envelope.attempts == live.retry_max_attempts + 1
        assert envelope.original_topic == "payments.commands"
        assert not [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    finally:
        set_faults(live, rate_limit_rate=0.0)
        dlq.close()
    # Leave the stack healthy for the next test: a fresh payment goes through again.
    probe = unique("pay")
    client.authorize(merchant_id=unique("m"), payment_id=probe, idempotency_key="a",
                     amount=100, currency="USD", payment_method="tok_visa")
    client.flush()

    def probe_captured(_records: object) -> bool:
        return any(v["payment_id"] == probe and v["type"] == "payment.captured"
                   for v in events.values())

    events.until(probe_captured, timeout=60)
