"""SandboxAdapter against a real sandbox over HTTP: tokens, idempotency, faults, money flows."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from psp.protocol import (
    STATUS_NOT_FOUND,
    AuthorizeRequest,
    CaptureRequest,
    PspAdapter,
    RefundRequest,
    VoidRequest,
)
from psp.sandbox_adapter import SandboxAdapter
from tests.psp.psp_harness import Sandbox


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def authorize_req(
    token: str = "tok_visa",  # noqa: S107 - a PSP test token, not a secret
    *,
    amount: int = 1000,
    capture_method: str = "automatic",
    attempt_id: str | None = None,
    payment_id: str | None = None,
) -> AuthorizeRequest:
    return AuthorizeRequest.model_validate(
        {
            "attempt_id": attempt_id or _id("att"),
            "payment_id": payment_id or _id("pay"),
            "merchant_id": "m_1",
            "amount": amount,
            "currency": "USD",
            "payment_method": token,
            "capture_method": capture_method,
        }
    )


async def test_adapter_satisfies_protocol(sandbox: Sandbox) -> None:
    adapter: PspAdapter = sandbox.adapter()
    assert isinstance(adapter, PspAdapter)
    assert adapter.name == "alpha"


@pytest.mark.parametrize(
    ("token", "outcome", "status", "decline_code"),
    [
        ("tok_visa", "succeeded", "succeeded", None),
        ("tok_mastercard", "succeeded", "succeeded", None),
        ("tok_createDispute", "succeeded", "succeeded", None),
        ("tok_refundFail", "succeeded", "succeeded", None),
        ("tok_threeDSecureRequired", "requires_action", "requires_action", None),
        ("tok_chargeDeclined", "declined", "requires_payment_method", "generic_decline"),
        (
            "tok_chargeDeclinedInsufficientFunds",
            "declined",
            "requires_payment_method",
            "insufficient_funds",
        ),
        ("tok_chargeDeclinedLostCard", "declined", "requires_payment_method", "lost_card"),
        ("tok_chargeDeclinedStolenCard", "declined", "requires_payment_method", "stolen_card"),
        ("tok_chargeDeclinedExpiredCard", "declined", "requires_payment_method", "expired_card"),
        (
            "tok_chargeDeclinedIncorrectCvc",
            "declined",
            "requires_payment_method",
            "incorrect_cvc",
        ),
        (
            "tok_chargeDeclinedProcessingError",
            "retryable_error",
            "requires_payment_method",
            "processing_error",
        ),
        ("tok_doesNotExist", "declined", None, "resource_missing"),
    ],
)
async def test_magic_tokens(
    sandbox: Sandbox, token: str, outcome: str, status: str | None, decline_code: str | None
) -> None:
    result = await sandbox.adapter().authorize(authorize_req(token, amount=1234))
    assert result.outcome == outcome
    assert result.status == status
    assert result.decline_code == decline_code
    assert result.psp == "alpha"
    if outcome == "succeeded":
        assert result.psp_reference is not None and result.psp_reference.startswith("pi_")
        assert result.amount_authorized == 1234
        assert result.amount_captured == 1234
    else:
        assert result.amount_captured == 0
    if status is not None:
        # The lost-response resolver path sees the same outcome.
        again = await sandbox.adapter().retrieve(psp_reference=result.psp_reference)
        assert (again.outcome, again.status, again.decline_code) == (outcome, status, decline_code)


async def test_manual_capture_authorizes_only(sandbox: Sandbox) -> None:
    result = await sandbox.adapter().authorize(authorize_req(capture_method="manual", amount=500))
    assert (result.outcome, result.status) == ("succeeded", "requires_capture")
    assert (result.amount_authorized, result.amount_captured) == (500, 0)


async def test_idempotent_replay_charges_once(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    req = authorize_req()
    first = await adapter.authorize(req)
    second = await adapter.authorize(req)
    assert first.outcome == second.outcome == "succeeded"
    assert first.psp_reference == second.psp_reference
    charges = await sandbox.charges()
    assert len(charges) == 1
    assert charges[0]["idempotency_key"] == req.attempt_id
    assert charges[0]["payment_id"] == req.payment_id
    assert charges[0]["merchant_id"] == "m_1"
    assert charges[0]["amount"] == 1000


async def test_declines_are_replayed_too(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    req = authorize_req("tok_chargeDeclinedInsufficientFunds")
    first = await adapter.authorize(req)
    second = await adapter.authorize(req)
    assert first == second
    assert len(await sandbox.charges()) == 1


async def test_same_key_different_params_is_an_idempotency_error(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    req = authorize_req()
    assert (await adapter.authorize(req)).outcome == "succeeded"
    other = req.model_copy(update={"amount": 999})
    result = await adapter.authorize(other)
    assert result.outcome == "declined"
    assert result.decline_code == "idempotency_error"
    assert len(await sandbox.charges()) == 1


@pytest.mark.parametrize("fault", ["lost_response", "timeout"])
async def test_lost_or_late_answer_is_unknown_and_retrieve_finds_it(
    sandbox: Sandbox, fault: str
) -> None:
    req = authorize_req(amount=4321)
    result = await sandbox.adapter(timeout=0.3, fault=fault).authorize(req)
    assert result.outcome == "unknown"
    charges = await sandbox.charges()
    assert len(charges) == 1
    assert charges[0]["idempotency_key"] == req.attempt_id
    assert charges[0]["status"] == "succeeded"

    clean = sandbox.adapter()
    found = await clean.retrieve(attempt_id=req.attempt_id)
    assert found.outcome == "succeeded"
    assert found.psp_reference == charges[0]["id"]
    assert found.amount_captured == 4321
    # Retrying the attempt replays the stored answer; still one charge.
    retried = await clean.authorize(req)
    assert retried.psp_reference == found.psp_reference
    assert len(await sandbox.charges()) == 1


async def test_retrieve_unknown_attempt_is_not_found(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    result = await adapter.retrieve(attempt_id="att_never_sent")
    assert (result.outcome, result.status) == ("unknown", STATUS_NOT_FOUND)
    by_ref = await adapter.retrieve(psp_reference="pi_missing")
    assert (by_ref.outcome, by_ref.status) == ("unknown", STATUS_NOT_FOUND)
    with pytest.raises(ValueError):
        await adapter.retrieve()


async def test_connection_refused_is_not_sent(unused_port: int) -> None:
    adapter = SandboxAdapter("alpha", f"http://127.0.0.1:{unused_port}", "sk_test_alpha", 1.0)
    try:
        result = await adapter.authorize(authorize_req())
        assert result.outcome == "not_sent"
        assert (await adapter.retrieve(attempt_id="att_x")).outcome == "not_sent"
    finally:
        await adapter.close()


async def test_wrong_api_key_is_not_sent(sandbox: Sandbox) -> None:
    result = await sandbox.adapter(api_key="sk_test_wrong").authorize(authorize_req())
    assert result.outcome == "not_sent"
    assert result.decline_code == "api_key_invalid"
    assert await sandbox.charges() == []


async def test_5xx_is_retryable_and_the_same_attempt_can_be_retried(sandbox: Sandbox) -> None:
    req = authorize_req()
    result = await sandbox.adapter(fault="5xx").authorize(req)
    assert result.outcome == "retryable_error"
    assert await sandbox.charges() == []
    retried = await sandbox.adapter().authorize(req)
    assert retried.outcome == "succeeded"
    assert len(await sandbox.charges()) == 1


async def test_429_is_retryable_with_retry_after(sandbox: Sandbox) -> None:
    result = await sandbox.adapter(fault="429").authorize(authorize_req())
    assert result.outcome == "retryable_error"
    assert result.retry_after == 1.0
    assert result.decline_code == "rate_limit"
    assert await sandbox.charges() == []


async def test_global_fault_knobs(sandbox: Sandbox) -> None:
    async with sandbox.http.post(
        f"{sandbox.base_url}/sandbox/faults", json={"error_rate": 1.0}
    ) as resp:
        assert resp.status == 200
    assert (await sandbox.adapter().authorize(authorize_req())).outcome == "retryable_error"
    async with sandbox.http.post(
        f"{sandbox.base_url}/sandbox/faults", json={"error_rate": 0, "lost_response_rate": 1}
    ) as resp:
        assert resp.status == 200
    assert (await sandbox.adapter().authorize(authorize_req())).outcome == "unknown"
    assert len(await sandbox.charges()) == 1
    async with sandbox.http.post(
        f"{sandbox.base_url}/sandbox/faults", json={"error_rate": 2}
    ) as resp:
        assert resp.status == 400


async def test_key_in_flight_is_unknown(sandbox: Sandbox) -> None:
    req = authorize_req()
    slow = asyncio.create_task(sandbox.adapter(fault="latency=30000").authorize(req))
    # Wait (by yielding, not by time) until the sandbox has reserved the key.
    for _ in range(10_000):
        entry = sandbox.state.idempotency.get(req.attempt_id)
        if entry is not None and entry.in_flight:
            break
        await asyncio.sleep(0)
    else:
        pytest.fail("first request never reached the sandbox")
    second = await sandbox.adapter().authorize(req)
    assert second.outcome == "unknown"
    assert second.decline_code == "idempotency_key_in_use"
    slow.cancel()


async def test_partial_capture_once(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    auth = await adapter.authorize(authorize_req(capture_method="manual", amount=1000))
    assert auth.psp_reference is not None
    ref = auth.psp_reference

    too_much = await adapter.capture(
        CaptureRequest(attempt_id=_id("cap"), payment_id="p", psp_reference=ref, amount=1001)
    )
    assert (too_much.outcome, too_much.decline_code) == ("declined", "amount_too_large")

    cap_req = CaptureRequest(attempt_id=_id("cap"), payment_id="p", psp_reference=ref, amount=600)
    captured = await adapter.capture(cap_req)
    assert (captured.outcome, captured.status) == ("succeeded", "succeeded")
    assert captured.amount_captured == 600
    assert (await adapter.capture(cap_req)) == captured  # replay

    again = await adapter.capture(
        CaptureRequest(attempt_id=_id("cap"), payment_id="p", psp_reference=ref, amount=400)
    )
    assert again.outcome == "declined"
    assert again.decline_code == "payment_intent_unexpected_state"
    assert again.status == "succeeded"

    (charge,) = await sandbox.charges()
    assert (charge["amount_captured"], charge["amount_authorized"]) == (600, 0)


async def test_void_then_capture_is_declined(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    auth = await adapter.authorize(authorize_req(capture_method="manual"))
    assert auth.psp_reference is not None
    voided = await adapter.void(
        VoidRequest(attempt_id=_id("void"), payment_id="p", psp_reference=auth.psp_reference)
    )
    assert (voided.outcome, voided.status) == ("succeeded", "canceled")
    late = await adapter.capture(
        CaptureRequest(
            attempt_id=_id("cap"), payment_id="p", psp_reference=auth.psp_reference, amount=1
        )
    )
    assert (late.outcome, late.status) == ("declined", "canceled")
    (charge,) = await sandbox.charges()
    assert (charge["status"], charge["amount_authorized"]) == ("canceled", 0)


async def test_refunds_never_exceed_received(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    auth = await adapter.authorize(authorize_req(amount=1000))
    assert auth.psp_reference is not None
    ref = auth.psp_reference

    def refund(amount: int, attempt_id: str | None = None) -> RefundRequest:
        return RefundRequest(
            attempt_id=attempt_id or _id("ref"), payment_id="p", psp_reference=ref, amount=amount
        )

    first = await adapter.refund(refund(400, "ref_first"))
    assert (first.outcome, first.status, first.amount_refunded) == ("succeeded", "succeeded", 400)
    assert first.refund_reference is not None and first.refund_reference.startswith("re_")
    assert (await adapter.refund(refund(400, "ref_first"))) == first  # replay, no second refund

    over = await adapter.refund(refund(601))
    assert (over.outcome, over.decline_code) == ("declined", "amount_too_large")
    rest = await adapter.refund(refund(600))
    assert rest.outcome == "succeeded"
    done = await adapter.refund(refund(1))
    assert (done.outcome, done.decline_code) == ("declined", "charge_already_refunded")

    (charge,) = await sandbox.charges()
    assert charge["amount_refunded"] == 1000
    assert (await adapter.retrieve(psp_reference=ref)).amount_refunded == 1000


async def test_refund_of_uncaptured_is_declined(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    auth = await adapter.authorize(authorize_req(capture_method="manual"))
    assert auth.psp_reference is not None
    result = await adapter.refund(
        RefundRequest(
            attempt_id=_id("r"), payment_id="p", psp_reference=auth.psp_reference, amount=1
        )
    )
    assert (result.outcome, result.decline_code) == ("declined", "payment_intent_unexpected_state")


async def test_refund_fail_token_refund_is_pending_then_failed(sandbox: Sandbox) -> None:
    adapter = sandbox.adapter()
    auth = await adapter.authorize(authorize_req("tok_refundFail", amount=700))
    assert auth.psp_reference is not None
    result = await adapter.refund(
        RefundRequest(
            attempt_id=_id("r"), payment_id="p", psp_reference=auth.psp_reference, amount=700
        )
    )
    assert (result.outcome, result.status) == ("succeeded", "pending")
    status, body = await sandbox.get(f"/v1/refunds/{result.refund_reference}")
    assert (status, body["status"]) == (200, "failed")
    (charge,) = await sandbox.charges()
    assert charge["amount_refunded"] == 0
