"""The sandbox's HTTP contract, spoken raw: auth, idempotency replay, form bodies, control plane."""

from __future__ import annotations

from datetime import datetime

from psp.sandbox.app import create_app
from tests.psp.psp_harness import Sandbox

INTENT = {
    "amount": 2500,
    "currency": "eur",
    "payment_method": "tok_visa",
    "capture_method": "manual",
    "metadata": {"payment_id": "pay_1", "merchant_id": "m_1"},
}


async def test_healthz_and_auth(sandbox: Sandbox) -> None:
    async with sandbox.http.get(f"{sandbox.base_url}/healthz") as resp:
        assert resp.status == 200
    status, body, _ = await sandbox.post("/v1/payment_intents", INTENT, api_key="sk_wrong")
    assert status == 401
    assert body["error"]["type"] == "invalid_request_error"
    async with sandbox.http.get(f"{sandbox.base_url}/v1/payment_intents/pi_x") as resp:
        assert resp.status == 401


async def test_create_intent_shape(sandbox: Sandbox) -> None:
    status, pi, _ = await sandbox.post("/v1/payment_intents", INTENT)
    assert status == 200
    assert pi["id"].startswith("pi_")
    assert pi["object"] == "payment_intent"
    assert (pi["status"], pi["amount_capturable"], pi["amount_received"]) == (
        "requires_capture",
        2500,
        0,
    )
    assert pi["metadata"] == INTENT["metadata"]
    assert pi["last_payment_error"] is None


async def test_decline_uses_stripe_error_shape(sandbox: Sandbox) -> None:
    body_in = {**INTENT, "payment_method": "tok_chargeDeclinedInsufficientFunds"}
    status, body, _ = await sandbox.post("/v1/payment_intents", body_in)
    assert status == 402
    error = body["error"]
    assert (error["type"], error["code"], error["decline_code"]) == (
        "card_error",
        "card_declined",
        "insufficient_funds",
    )
    assert error["payment_intent"]["status"] == "requires_payment_method"
    assert error["payment_intent"]["last_payment_error"]["decline_code"] == "insufficient_funds"


async def test_idempotent_replay_is_byte_for_byte(sandbox: Sandbox) -> None:
    first = await sandbox.post("/v1/payment_intents", INTENT, key="k1")
    second = await sandbox.post("/v1/payment_intents", INTENT, key="k1")
    assert first[:2] == second[:2]
    assert second[2].get("Idempotent-Replayed") == "true"
    conflict = await sandbox.post("/v1/payment_intents", {**INTENT, "amount": 1}, key="k1")
    assert conflict[0] == 400
    assert conflict[1]["error"]["type"] == "idempotency_error"
    assert len(await sandbox.charges()) == 1


async def test_invalid_params_are_not_remembered(sandbox: Sandbox) -> None:
    status, body, _ = await sandbox.post("/v1/payment_intents", {**INTENT, "amount": 10.5}, key="k")
    assert (status, body["error"]["param"]) == (400, "amount")
    status, _, _ = await sandbox.post("/v1/payment_intents", INTENT, key="k")
    assert status == 200


async def test_form_encoded_body(sandbox: Sandbox) -> None:
    form = {
        "amount": "700",
        "currency": "usd",
        "payment_method": "tok_mastercard",
        "metadata[payment_id]": "pay_form",
        "metadata[merchant_id]": "m_form",
    }
    async with sandbox.http.post(
        f"{sandbox.base_url}/v1/payment_intents",
        data=form,
        headers={"Authorization": "Bearer sk_test_alpha"},
    ) as resp:
        assert resp.status == 200
        pi = await resp.json()
    assert (pi["amount"], pi["status"], pi["metadata"]["payment_id"]) == (
        700,
        "succeeded",
        "pay_form",
    )


async def test_lookup_by_idempotency_key_and_payment_id(sandbox: Sandbox) -> None:
    _, pi, _ = await sandbox.post("/v1/payment_intents", INTENT, key="att_lookup")
    status, listing = await sandbox.get("/v1/payment_intents?idempotency_key=att_lookup")
    assert status == 200
    assert [item["id"] for item in listing["data"]] == [pi["id"]]
    _, by_payment = await sandbox.get("/v1/payment_intents?payment_id=pay_1")
    assert [item["id"] for item in by_payment["data"]] == [pi["id"]]
    _, none = await sandbox.get("/v1/payment_intents?idempotency_key=nope")
    assert none["data"] == []


async def test_ground_truth_and_reset(sandbox: Sandbox) -> None:
    await sandbox.post("/v1/payment_intents", INTENT, key="gt")
    (charge,) = await sandbox.charges()
    assert charge["idempotency_key"] == "gt"
    assert charge["payment_id"] == "pay_1"
    assert (charge["amount"], charge["currency"], charge["status"]) == (
        2500,
        "eur",
        "requires_capture",
    )
    created = datetime.fromisoformat(charge["created"])
    assert created.tzinfo is not None
    async with sandbox.http.post(f"{sandbox.base_url}/sandbox/reset") as resp:
        assert resp.status == 200
    assert await sandbox.charges() == []


async def test_unknown_fault_is_rejected(sandbox: Sandbox) -> None:
    status, body, _ = await sandbox.post("/v1/payment_intents", INTENT, fault="meteor")
    assert status == 400
    assert await sandbox.charges() == []


def test_create_app_is_independent_per_psp() -> None:
    from psp.sandbox import SANDBOX_STATE

    alpha = create_app("alpha", "sk_a", "whsec_a")
    beta = create_app("beta", "sk_b", "whsec_b", latency_ms=5)
    assert alpha[SANDBOX_STATE] is not beta[SANDBOX_STATE]
    assert beta[SANDBOX_STATE].faults.latency_ms == 5
