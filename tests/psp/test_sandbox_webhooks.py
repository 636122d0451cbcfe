"""Webhook signatures (schemas.signatures) and the sandbox's signed webhook deliveries, over real
HTTP: a sandbox and a local aiohttp receiver, both on ephemeral ports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from psp.sandbox.server import _parser
from schemas.signatures import PSP_SIGNATURE_HEADER as SIGNATURE_HEADER
from schemas.signatures import SignatureError, sign_payload, verify_signature
from tests.psp.psp_harness import WEBHOOK_SECRET, Sandbox
from tests.psp.webhook_harness import (
    Receiver,
    configure_webhooks,
    running_receiver,
    running_sandbox,
    wait_until,
    webhook_log,
)

PAYLOAD = b'{"id":"evt_1","type":"payment_intent.succeeded"}'
NOW = 1_700_000_000
INTENT = {
    "amount": 2500,
    "currency": "eur",
    "payment_method": "tok_visa",
    "metadata": {"payment_id": "pay_1", "merchant_id": "m_1"},
}

# --- signatures --------------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW)
    assert header.startswith(f"t={NOW},v1=")
    assert len(header.split("v1=")[1]) == 64
    assert verify_signature(PAYLOAD, header, "whsec_a", now=NOW) == NOW
    assert verify_signature(PAYLOAD, header, "whsec_a", now=NOW + 300) == NOW


def test_tampered_body_fails() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW)
    with pytest.raises(SignatureError, match="No signatures found matching"):
        verify_signature(PAYLOAD.replace(b"evt_1", b"evt_2"), header, "whsec_a", now=NOW)


def test_wrong_secret_fails() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW)
    with pytest.raises(SignatureError, match="No signatures found matching"):
        verify_signature(PAYLOAD, header, "whsec_b", now=NOW)


def test_stale_timestamp_fails() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW)
    with pytest.raises(SignatureError, match="301s old"):
        verify_signature(PAYLOAD, header, "whsec_a", now=NOW + 301)
    with pytest.raises(SignatureError, match="old"):
        verify_signature(PAYLOAD, header, "whsec_a", tolerance=10, now=NOW + 11)


def test_future_timestamp_fails() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW + 301)
    with pytest.raises(SignatureError, match="in the future"):
        verify_signature(PAYLOAD, header, "whsec_a", now=NOW)


def test_rotation_two_secrets_both_verify() -> None:
    old, new = "whsec_old", "whsec_new"
    for secret in (old, new):
        header = sign_payload(PAYLOAD, secret, NOW)
        assert verify_signature(PAYLOAD, header, [old, new], now=NOW) == NOW
        assert verify_signature(PAYLOAD, header, (new, old), now=NOW) == NOW
    # A sender signing with both secrets at once: several v1 entries.
    both = sign_payload(PAYLOAD, old, NOW) + ",v1=" + sign_payload(PAYLOAD, new, NOW)[-64:]
    assert verify_signature(PAYLOAD, both, new, now=NOW) == NOW
    assert verify_signature(PAYLOAD, both, old, now=NOW) == NOW
    with pytest.raises(SignatureError):
        verify_signature(PAYLOAD, both, ["whsec_other"], now=NOW)


@pytest.mark.parametrize(
    "header",
    ["", "garbage", "t=abc,v1=00", "v1=00", f"t={NOW}", f"t={NOW},v0=00", f"t={NOW},t=1,v1=0"],
)
def test_malformed_header_fails(header: str) -> None:
    with pytest.raises(SignatureError, match="Malformed"):
        verify_signature(PAYLOAD, header, "whsec_a", now=NOW)


def test_no_secret_is_an_error() -> None:
    header = sign_payload(PAYLOAD, "whsec_a", NOW)
    with pytest.raises(SignatureError):
        verify_signature(PAYLOAD, header, [], now=NOW)
    assert issubclass(SignatureError, ValueError)


def test_cli_accepts_webhook_options() -> None:
    args = _parser().parse_args(
        ["--name", "a", "--port", "1", "--api-key", "k", "--webhook-url", "http://x/h"]
        + ["--fee-bps", "100", "--fee-fixed", "0", "--async-delay-ms", "5"]
    )
    assert (args.webhook_url, args.fee_bps, args.fee_fixed, args.async_delay_ms) == (
        "http://x/h",
        100,
        0,
        5.0,
    )


# --- deliveries --------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as rec:
        yield rec


@pytest.fixture
async def hooked(receiver: Receiver) -> AsyncIterator[Sandbox]:
    """A sandbox whose webhooks go to ``receiver``, retrying fast."""
    async with running_sandbox(webhook_url=receiver.url, seed=7) as box:
        await configure_webhooks(box, retry_backoff_ms=1)
        yield box


def _of_type(receiver: Receiver, event_type: str) -> list[dict[str, Any]]:
    return receiver.events(event_type)


async def test_succeeded_webhook_is_signed_and_verifies(
    hooked: Sandbox, receiver: Receiver
) -> None:
    status, pi, _ = await hooked.post("/v1/payment_intents", INTENT)
    assert (status, pi["status"]) == (200, "succeeded")
    await receiver.wait_for(lambda: bool(_of_type(receiver, "payment_intent.succeeded")))
    (call,) = [c for c in receiver.accepted if c.event["type"] == "payment_intent.succeeded"]
    assert verify_signature(call.body, call.headers[SIGNATURE_HEADER], WEBHOOK_SECRET) > 0
    with pytest.raises(SignatureError):
        verify_signature(call.body, call.headers[SIGNATURE_HEADER], "whsec_wrong")
    event = call.event
    assert event["id"].startswith("evt_")
    assert event["object"] == "event"
    assert isinstance(event["created"], int)
    obj = event["data"]["object"]
    assert (obj["id"], obj["object"], obj["amount_received"]) == (pi["id"], "payment_intent", 2500)
    assert obj["metadata"]["payment_id"] == "pay_1"
    (logged,) = [e for e in await webhook_log(hooked) if e["id"] == event["id"]]
    assert (logged["attempts"], logged["delivered"], logged["last_status"]) == (1, 1, 200)


async def test_lifecycle_event_types(hooked: Sandbox, receiver: Receiver) -> None:
    manual = {**INTENT, "capture_method": "manual"}
    _, captured, _ = await hooked.post("/v1/payment_intents", manual)
    await hooked.post(f"/v1/payment_intents/{captured['id']}/capture", {"amount_to_capture": 2000})
    _, canceled, _ = await hooked.post("/v1/payment_intents", manual)
    await hooked.post(f"/v1/payment_intents/{canceled['id']}/cancel", {})
    status, declined, _ = await hooked.post(
        "/v1/payment_intents", {**INTENT, "payment_method": "tok_chargeDeclined"}
    )
    assert status == 402
    _, refunded, _ = await hooked.post("/v1/payment_intents", INTENT)
    await hooked.post("/v1/refunds", {"payment_intent": refunded["id"], "amount": 100})
    expected = [
        ("payment_intent.amount_capturable_updated", captured["id"]),
        ("payment_intent.succeeded", captured["id"]),
        ("payment_intent.amount_capturable_updated", canceled["id"]),
        ("payment_intent.canceled", canceled["id"]),
        ("payment_intent.payment_failed", declined["error"]["payment_intent"]["id"]),
        ("payment_intent.succeeded", refunded["id"]),
        ("charge.refunded", "ch_" + refunded["id"].removeprefix("pi_")),
    ]
    await receiver.wait_for(lambda: len(receiver.events()) >= len(expected))
    got = [(e["type"], e["data"]["object"]["id"]) for e in receiver.events()]
    assert got == expected  # no reordering by default: emission order
    charge = receiver.events("charge.refunded")[0]["data"]["object"]
    assert (charge["payment_intent"], charge["amount_refunded"]) == (refunded["id"], 100)
    succeeded = receiver.events("payment_intent.succeeded")[0]["data"]["object"]
    assert succeeded["amount_received"] == 2000


async def test_duplicates_carry_the_same_event_id(hooked: Sandbox, receiver: Receiver) -> None:
    await configure_webhooks(hooked, duplicate_rate=1.0)
    _, pi, _ = await hooked.post("/v1/payment_intents", INTENT)
    await receiver.wait_for(lambda: len(receiver.events()) == 2)
    first, second = receiver.events()
    assert first["id"] == second["id"]
    assert first == second
    assert receiver.accepted[0].body == receiver.accepted[1].body
    (logged,) = await webhook_log(hooked)
    assert (logged["copies"], logged["delivered"]) == (2, 2)


async def test_reordered_events_all_arrive(hooked: Sandbox, receiver: Receiver) -> None:
    await configure_webhooks(hooked, reorder=True, reorder_window=3, reorder_flush_ms=5)
    for n in range(7):  # 7 events: two full windows and a partial one flushed on idle
        status, _, _ = await hooked.post(
            "/v1/payment_intents", {**INTENT, "metadata": {"payment_id": f"p{n}"}}
        )
        assert status == 200
    emitted = {e["id"] for e in await webhook_log(hooked)}
    assert len(emitted) == 7
    await receiver.wait_for(lambda: {e["id"] for e in receiver.events()} == emitted)
    assert len(receiver.events()) == 7


async def test_receiver_error_is_retried_until_delivered(
    hooked: Sandbox, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    await hooked.post("/v1/payment_intents", INTENT)
    await receiver.wait_for(lambda: len(receiver.events()) == 1)
    assert [c.headers["X-Answered"] for c in receiver.calls] == ["500", "503", "200"]
    assert len({c.event["id"] for c in receiver.calls}) == 1
    for call in receiver.calls:  # every attempt is signed (afresh) and verifies
        verify_signature(call.body, call.headers[SIGNATURE_HEADER], WEBHOOK_SECRET)
    (logged,) = await webhook_log(hooked)
    assert (logged["attempts"], logged["delivered"], logged["last_status"]) == (3, 1, 200)


async def test_retries_give_up_after_max_attempts(hooked: Sandbox, receiver: Receiver) -> None:
    await configure_webhooks(hooked, max_attempts=2)
    receiver.statuses = [500] * 5

    async def given_up() -> bool:
        log = await webhook_log(hooked)
        return bool(log) and log[0]["attempts"] == 2

    await hooked.post("/v1/payment_intents", INTENT)
    await wait_until(given_up)
    (logged,) = await webhook_log(hooked)
    assert (logged["delivered"], logged["last_status"], logged["last_error"]) == (
        0,
        500,
        "HTTP 500",
    )
    assert len(receiver.calls) == 2


async def test_unreachable_url_is_recorded(unused_port: int) -> None:
    async with running_sandbox(webhook_url=f"http://127.0.0.1:{unused_port}/h") as box:
        await configure_webhooks(box, retry_backoff_ms=1, max_attempts=2)

        async def given_up() -> bool:
            log = await webhook_log(box)
            return bool(log) and log[0]["attempts"] == 2

        await box.post("/v1/payment_intents", INTENT)
        await wait_until(given_up)
        (logged,) = await webhook_log(box)
        assert logged["last_status"] is None
        assert "Error" in logged["last_error"]


async def test_no_url_records_events_without_sending() -> None:
    async with running_sandbox() as box:
        await box.post("/v1/payment_intents", INTENT)
        (logged,) = await webhook_log(box)
        assert (logged["type"], logged["copies"], logged["attempts"]) == (
            "payment_intent.succeeded",
            0,
            0,
        )


async def test_url_can_be_set_at_runtime(receiver: Receiver) -> None:
    async with running_sandbox() as box:
        config = await configure_webhooks(box, url=receiver.url, delay_ms=1)
        assert (config["url"], config["delay_ms"]) == (receiver.url, 1.0)
        await box.post("/v1/payment_intents", INTENT)
        await receiver.wait_for(lambda: len(receiver.events()) == 1)


@pytest.mark.parametrize(
    "knobs",
    [
        {"url": "ftp://x"},
        {"duplicate_rate": 1.5},
        {"reorder": "maybe"},
        {"delay_ms": -1},
        {"max_attempts": 0},
        {"meteor": 1},
    ],
)
async def test_bad_webhook_config_is_rejected(hooked: Sandbox, knobs: dict[str, Any]) -> None:
    async with hooked.http.post(f"{hooked.base_url}/sandbox/webhooks/config", json=knobs) as resp:
        assert resp.status == 400


async def test_refund_fail_is_pending_then_failed_webhook(
    hooked: Sandbox, receiver: Receiver
) -> None:
    _, pi, _ = await hooked.post(
        "/v1/payment_intents", {**INTENT, "payment_method": "tok_refundFail"}
    )
    status, refund, _ = await hooked.post("/v1/refunds", {"payment_intent": pi["id"]})
    assert (status, refund["status"], refund["failure_reason"]) == (200, "pending", None)
    await receiver.wait_for(lambda: bool(receiver.events("charge.refund.updated")))
    (event,) = receiver.events("charge.refund.updated")
    obj = event["data"]["object"]
    assert (obj["id"], obj["object"], obj["status"]) == (refund["id"], "refund", "failed")
    assert obj["failure_reason"] == "expired_or_canceled_card"
    assert receiver.events("charge.refunded") == []


async def test_dispute_created_after_capture(hooked: Sandbox, receiver: Receiver) -> None:
    manual = {**INTENT, "payment_method": "tok_createDispute", "capture_method": "manual"}
    _, pi, _ = await hooked.post("/v1/payment_intents", manual)
    await hooked.post(f"/v1/payment_intents/{pi['id']}/capture", {})
    await receiver.wait_for(lambda: bool(receiver.events("charge.dispute.created")))
    types = [e["type"] for e in receiver.events()]
    assert types.index("payment_intent.succeeded") < types.index("charge.dispute.created")
    dispute = receiver.events("charge.dispute.created")[0]["data"]["object"]
    assert (dispute["payment_intent"], dispute["amount"], dispute["object"]) == (
        pi["id"],
        2500,
        "dispute",
    )
    assert dispute["id"].startswith("dp_")


# --- payouts -------------------------------------------------------------------------------


async def test_payout_ok_is_paid(hooked: Sandbox, receiver: Receiver) -> None:
    body = {"amount": 10_000, "currency": "EUR", "destination": "btok_ok", "metadata": {"b": "1"}}
    status, payout, _ = await hooked.post("/v1/payouts", body, key="po-1")
    assert (status, payout["status"], payout["currency"]) == (200, "pending", "eur")
    assert payout["id"].startswith("po_")
    await receiver.wait_for(lambda: bool(receiver.events("payout.paid")))
    (event,) = receiver.events("payout.paid")
    assert (event["data"]["object"]["id"], event["data"]["object"]["status"]) == (
        payout["id"],
        "paid",
    )
    status, fetched = await hooked.get(f"/v1/payouts/{payout['id']}")
    assert (status, fetched["status"], fetched["amount"]) == (200, "paid", 10_000)
    # Idempotency: replay answers the first response, different parameters are refused.
    status, replay, headers = await hooked.post("/v1/payouts", body, key="po-1")
    assert (status, replay, headers.get("Idempotent-Replayed")) == (200, payout, "true")
    status, conflict, _ = await hooked.post("/v1/payouts", {**body, "amount": 1}, key="po-1")
    assert (status, conflict["error"]["type"]) == (400, "idempotency_error")
    assert len(hooked.state.payouts) == 1


async def test_payout_to_failing_account_fails_later(hooked: Sandbox, receiver: Receiver) -> None:
    body = {"amount": 500, "currency": "eur", "destination": "btok_fail"}
    status, payout, _ = await hooked.post("/v1/payouts", body)
    assert (status, payout["status"]) == (200, "pending")
    await receiver.wait_for(lambda: bool(receiver.events("payout.failed")))
    obj = receiver.events("payout.failed")[0]["data"]["object"]
    assert (obj["id"], obj["status"], obj["failure_code"]) == (
        payout["id"],
        "failed",
        "account_closed",
    )
    _, fetched = await hooked.get(f"/v1/payouts/{payout['id']}")
    assert fetched["status"] == "failed"
    assert receiver.events("payout.paid") == []


async def test_payout_errors(hooked: Sandbox) -> None:
    status, body, _ = await hooked.post(
        "/v1/payouts", {"amount": 5, "currency": "eur", "destination": "btok_nope"}
    )
    assert (status, body["error"]["param"]) == (400, "destination")
    status, body, _ = await hooked.post("/v1/payouts", {"amount": 5, "currency": "eur"})
    assert (status, body["error"]["code"]) == (400, "parameter_missing")
    status, body = await hooked.get("/v1/payouts/po_missing")
    assert (status, body["error"]["code"]) == (404, "resource_missing")
