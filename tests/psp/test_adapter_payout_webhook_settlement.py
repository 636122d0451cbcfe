"""SandboxAdapter.payout, parse_webhook and settlement_report against a real sandbox."""

from __future__ import annotations

import json
import time

import pytest

from psp.protocol import AuthorizeRequest, PayoutRequest
from psp.sandbox_adapter import SandboxAdapter
from schemas.signatures import SignatureError, sign_payload
from tests.psp.psp_harness import API_KEY, PSP_NAME, WEBHOOK_SECRET
from tests.psp.webhook_harness import running_receiver, running_sandbox


def adapter_for(base_url: str, secrets: tuple[str, ...] = (WEBHOOK_SECRET,)) -> SandboxAdapter:
    return SandboxAdapter(PSP_NAME, base_url, API_KEY, 2.0, webhook_secrets=secrets)


async def test_payout_is_idempotent_by_attempt_id() -> None:
    async with running_sandbox() as box:
        adapter = adapter_for(box.base_url)
        try:
            request = PayoutRequest(attempt_id="att_po_1", payout_id="po_1", merchant_id="m_1",
                                    amount=5_000, currency="USD", destination="btok_ok")
            first = await adapter.payout(request)
            again = await adapter.payout(request)
        finally:
            await adapter.close()
    assert first.outcome == "succeeded" and first.psp_reference
    assert again.psp_reference == first.psp_reference


async def test_parse_webhook_verifies_and_normalises_a_sandbox_event() -> None:
    async with running_receiver() as receiver, running_sandbox(webhook_url=None) as box:
        async with box.http.post(f"{box.base_url}/sandbox/webhooks/config",
                                 json={"url": receiver.url}) as resp:
            assert resp.status == 200
        adapter = adapter_for(box.base_url)
        try:
            result = await adapter.authorize(AuthorizeRequest(
                attempt_id="att_wh_1", payment_id="pay_wh_1", merchant_id="m_1", amount=1_234,
                currency="USD", payment_method="tok_visa", capture_method="automatic"))
            await receiver.wait_for(lambda: bool(receiver.events("payment_intent.succeeded")))
            delivery = next(r for r in receiver.accepted
                            if r.event["type"] == "payment_intent.succeeded")
            signature = delivery.headers["Stripe-Signature"]
            note = adapter.parse_webhook(delivery.body, signature)
            with pytest.raises(SignatureError):
                adapter.parse_webhook(delivery.body + b" ", signature)
            rotated = adapter_for(box.base_url, ("whsec_new", WEBHOOK_SECRET))
            assert rotated.parse_webhook(delivery.body, signature).event_id == (
                note.event_id
            )
        finally:
            await adapter.close()
    assert note.psp_reference == result.psp_reference
    assert note.payment_id == "pay_wh_1"
    assert (note.amount, note.currency, note.status) == (1_234, "USD", "succeeded")


def test_parse_webhook_without_a_secret_refuses() -> None:
    adapter = SandboxAdapter(PSP_NAME, "http://127.0.0.1:1", API_KEY, 1.0)
    body = json.dumps({"id": "evt_1", "type": "x"}).encode()
    with pytest.raises(SignatureError, match="no webhook secret"):
        adapter.parse_webhook(body, sign_payload(body, "whsec", int(time.time())))


async def test_settlement_report_lists_the_capture_with_its_fee() -> None:
    async with running_sandbox() as box:
        adapter = adapter_for(box.base_url)
        try:
            result = await adapter.authorize(AuthorizeRequest(
                attempt_id="att_st_1", payment_id="pay_st_1", merchant_id="m_1", amount=10_000,
                currency="EUR", payment_method="tok_visa", capture_method="automatic"))
            rows = await adapter.settlement_report()
        finally:
            await adapter.close()
    [row] = [r for r in rows if r.reference == result.psp_reference]
    assert (row.type, row.amount, row.currency, row.fee) == ("charge", 10_000, "EUR", 320)
