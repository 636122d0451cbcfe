"""PSP webhooks through the real pipeline: sandbox -> ingress -> psp.notifications -> state.

The stack's sandboxes post their signed webhooks to the worker's ingress. Here they are
made to deliver every event twice and in shuffled order, while lost responses leave
payments pending verification: final states must match the PSP's ground truth and the
ledger must not move on duplicates.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from sinks import ledger
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_lifecycle import set_faults
from tests.agents.test_pipeline import sandbox_charges, unique
from tests.conftest import async_wait_for
from topics.catalog import PSP_NOTIFICATIONS

pytestmark = pytest.mark.stack


def configure_webhooks(live: Settings, **knobs: Any) -> None:
    for psp in live.psp_endpoints():
        request = urllib.request.Request(  # noqa: S310 - local sandbox
            f"{psp.url}/sandbox/webhooks/config", data=json.dumps(knobs).encode(),
            method="POST", headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            assert response.status == 200


def latest(events: TopicReader, payment_id: str) -> dict[str, Any] | None:
    mine = [v for v in events.values() if v["payment_id"] == payment_id]
    return max(mine, key=lambda v: v["sequence"]) if mine else None


def test_a_refund_the_psp_fails_later_becomes_refund_failed(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    payment, merchant = unique("pay"), unique("m")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=5_000, currency="USD", payment_method="tok_refundFail")
    client.refund(merchant_id=merchant, payment_id=payment, idempotency_key="r",
                  refund_id="re_1", amount=2_000)
    client.flush()

    def refund_failed(_records: object) -> dict[str, Any] | None:
        for value in events.values():
            if value["payment_id"] == payment and value["type"] == "payment.refund_failed":
                return value
        return None

    failed = events.until(refund_failed, timeout=60)
    assert failed["refund_id"] == "re_1" and failed["status"] == "captured"
    assert failed["amount_refunded"] == 0
    assert not [v for v in events.values()
                if v["payment_id"] == payment and v["type"] == "payment.refunded"]


async def test_duplicated_and_reordered_webhooks_leave_right_states_and_ledger(
    live: Settings, client: PaymentsClient, events: TopicReader
) -> None:
    notifications = TopicReader(live.kafka_bootstrap_servers, PSP_NOTIFICATIONS)
    notifications.poll()
    seen_before = len(notifications.records)
    configure_webhooks(live, duplicate_rate=1.0, reorder=True, reorder_window=6)
    # Lost responses: the PSP acted but we never heard; a webhook or a lookup resolves it.
    set_faults(live, lost_response_rate=0.4)
    merchant = unique("m")
    payments: dict[str, str] = {}
    try:
        for n in range(24):
            payment = unique("pay")
            kind = ("auto", "manual", "refund", "decline")[n % 4]
            payments[payment] = kind
            token = "tok_chargeDeclined" if kind == "decline" else "tok_visa"
            client.authorize(merchant_id=merchant, payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=1_000 + n, currency="EUR",
                             payment_method=token,
                             capture_method="manual" if kind == "manual" else "automatic")
        client.flush()
        terminal = {"captured", "authorized", "declined", "failed", "canceled",
                    "refunded", "partially_refunded"}

        def settled(_records: object) -> bool:
            return all((latest(events, p) or {}).get("status") in terminal for p in payments)

        events.until(settled, timeout=90)
        set_faults(live, lost_response_rate=0.0)
        for payment, kind in payments.items():
            state = latest(events, payment)
            assert state is not None
            if kind == "manual" and state["status"] == "authorized":
                client.capture(merchant_id=merchant, payment_id=payment,
                               idempotency_key=f"{payment}-c")
            if kind == "refund" and state["status"] == "captured":
                client.refund(merchant_id=merchant, payment_id=payment,
                              idempotency_key=f"{payment}-r", refund_id="re_1", amount=400)
        client.flush()

        def all_final(_records: object) -> bool:
            return all(
                (latest(events, p) or {}).get("status")
                in {"captured", "partially_refunded", "declined", "failed"}
                for p in payments
            )

        events.until(all_final, timeout=90)
        # Every duplicate was delivered: the sandboxes sent each event twice.
        notifications.until(lambda recs: len(recs) - seen_before >= len(payments), timeout=60)
    finally:
        set_faults(live, lost_response_rate=0.0)
        configure_webhooks(live, duplicate_rate=0.0, reorder=False)
        notifications.close()

    truth = {c["payment_id"]: c for c in sandbox_charges(live) if c.get("payment_id") in payments}
    for payment, kind in payments.items():
        final = latest(events, payment)
        assert final is not None
        charge = truth.get(payment)
        if kind == "decline":
            assert final["status"] in {"declined", "failed"}
            assert charge is None or charge["amount_captured"] == 0
            continue
        assert charge is not None, payment
        assert final["amount_captured"] == charge["amount_captured"], (payment, final, charge)
        assert final["amount_refunded"] == charge["amount_refunded"], (payment, final, charge)

    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def ledger_caught_up() -> bool:
            rows = await conn.fetch(
                "SELECT p.payment_id, p.captured, p.refunded FROM ledger_payments p "
                "WHERE p.payment_id = ANY($1::text[])", list(payments),
            )
            got = {r["payment_id"]: (r["captured"], r["refunded"]) for r in rows}
            want = {p: (c["amount_captured"], c["amount_refunded"])
                    for p, c in truth.items() if c["amount_captured"]}
            return got == want

        await async_wait_for(ledger_caught_up, within=30)
        assert (await ledger.verify(conn)).ok
    finally:
        await conn.close()
