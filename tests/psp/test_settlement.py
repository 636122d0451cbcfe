"""The settlement report: psp.settlement's format and parser, and the sandbox's
``GET /sandbox/settlement`` over real HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from psp.sandbox.state import fee_for
from psp.settlement import (
    SETTLEMENT_COLUMNS,
    SettlementError,
    SettlementRow,
    format_settlement_csv,
    parse_settlement_csv,
)
from tests.psp.psp_harness import Sandbox
from tests.psp.webhook_harness import running_sandbox, settlement_csv, wait_until

HEADER = ",".join(SETTLEMENT_COLUMNS)
INTENT = {
    "amount": 2500,
    "currency": "eur",
    "payment_method": "tok_visa",
    "capture_method": "manual",
    "metadata": {"payment_id": "pay_secret_1", "merchant_id": "m_1"},
}

# --- format ------------------------------------------------------------------------------


def test_format_parse_round_trip() -> None:
    rows = [
        SettlementRow(
            reference="pi_1",
            type="charge",
            amount=2500,
            currency="eur",
            fee=103,
            status="succeeded",
            timestamp=datetime(2024, 5, 1, 12, 0, 1, tzinfo=UTC),
        ),
        SettlementRow(
            reference="re_1",
            type="refund",
            amount=500,
            currency="eur",
            fee=0,
            status="succeeded",
            # Another offset: written in UTC, same instant after parsing.
            timestamp=datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2))),
        ),
    ]
    text = format_settlement_csv(rows)
    assert text.splitlines()[0] == HEADER
    assert text.splitlines()[1] == "pi_1,charge,2500,eur,103,succeeded,2024-05-01T12:00:01Z"
    assert text.splitlines()[2].endswith(",2024-05-01T12:00:00Z")
    assert parse_settlement_csv(text) == rows
    parsed = parse_settlement_csv(text)
    assert all(isinstance(r.amount, int) and r.timestamp.tzinfo is not None for r in parsed)


def test_parse_accepts_offsets_and_blank_lines() -> None:
    text = f"{HEADER}\npo_1,payout,10,usd,0,paid,2024-05-01T12:00:00+00:00\n\n"
    (row,) = parse_settlement_csv(text)
    assert (row.type, row.amount, row.timestamp) == (
        "payout",
        10,
        datetime(2024, 5, 1, 12, tzinfo=UTC),
    )
    assert parse_settlement_csv(HEADER + "\r\n") == []


@pytest.mark.parametrize(
    "text",
    [
        "",
        "reference,type,amount\n",
        f"{HEADER},payment_id\n",
        f"{HEADER}\npi_1,charge,25.00,eur,1,succeeded,2024-05-01T12:00:00Z\n",
        f"{HEADER}\npi_1,charge,2500,eur,1.5,succeeded,2024-05-01T12:00:00Z\n",
        f"{HEADER}\npi_1,charge,-1,eur,1,succeeded,2024-05-01T12:00:00Z\n",
        f"{HEADER}\npi_1,charge,2500,eur,1,succeeded,2024-05-01T12:00:00\n",  # naive
        f"{HEADER}\npi_1,fee,2500,eur,1,succeeded,2024-05-01T12:00:00Z\n",
        f"{HEADER}\npi_1,charge,2500,eur,1,succeeded\n",
        f"{HEADER}\n,charge,2500,eur,1,succeeded,2024-05-01T12:00:00Z\n",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(SettlementError):
        parse_settlement_csv(text)


def test_fee_is_integer_half_up() -> None:
    assert fee_for(1000, 290, 30) == 29 + 30
    assert fee_for(1750, 290, 30) == 51 + 30  # 50.75 -> 51
    assert fee_for(50, 100, 0) == 1  # 0.5 -> 1
    assert fee_for(49, 100, 0) == 0  # 0.49 -> 0
    assert fee_for(250, 290, 0) == 7  # 7.25 -> 7


# --- the sandbox's report ----------------------------------------------------------------


async def test_report_lists_charge_refund_dispute_payout(sandbox: Sandbox) -> None:
    _, pi, _ = await sandbox.post("/v1/payment_intents", INTENT)
    await sandbox.post(f"/v1/payment_intents/{pi['id']}/capture", {"amount_to_capture": 2000})
    _, refund, _ = await sandbox.post("/v1/refunds", {"payment_intent": pi["id"], "amount": 500})
    _, uncaptured, _ = await sandbox.post("/v1/payment_intents", INTENT)
    _, disputed, _ = await sandbox.post(
        "/v1/payment_intents", {**INTENT, "payment_method": "tok_createDispute"}
    )
    await sandbox.post(f"/v1/payment_intents/{disputed['id']}/capture", {})
    _, payout, _ = await sandbox.post(
        "/v1/payouts", {"amount": 1000, "currency": "eur", "destination": "btok_ok"}
    )

    async def settled() -> bool:
        _, text = await settlement_csv(sandbox)
        rows = parse_settlement_csv(text)
        return any(r.type == "dispute" for r in rows) and any(
            r.type == "payout" and r.status == "paid" for r in rows
        )

    await wait_until(settled)
    content_type, text = await settlement_csv(sandbox)
    assert content_type == "text/csv"
    assert text.splitlines()[0] == HEADER
    assert "pay_secret_1" not in text  # our payment id is nowhere: match on reference
    rows = parse_settlement_csv(text)
    by_key = {(r.type, r.reference): r for r in rows}
    charge = by_key[("charge", pi["id"])]
    assert (charge.amount, charge.fee, charge.currency, charge.status) == (
        2000,
        fee_for(2000, 290, 30),
        "EUR",  # normalised upper-case
        "succeeded",
    )
    assert charge.fee == 88  # 2000 * 2.9% = 58, + 30
    assert charge.timestamp.tzinfo is not None
    assert (by_key[("refund", refund["id"])].amount, by_key[("refund", refund["id"])].fee) == (
        500,
        0,
    )
    assert by_key[("charge", disputed["id"])].amount == 2500
    dispute = by_key[("dispute", disputed["id"])]
    assert (dispute.amount, dispute.fee, dispute.status) == (2500, 1500, "needs_response")
    assert by_key[("payout", payout["id"])].amount == 1000
    assert ("charge", uncaptured["id"]) not in by_key  # authorized only: nothing settled
    assert len(rows) == 5
    assert [r.timestamp for r in rows] == sorted(r.timestamp for r in rows)


async def test_report_date_filter(sandbox: Sandbox) -> None:
    await sandbox.post("/v1/payment_intents", {**INTENT, "capture_method": "automatic"})
    _, text = await settlement_csv(sandbox)
    (row,) = parse_settlement_csv(text)
    day = row.timestamp.astimezone(UTC).date()
    _, same_day = await settlement_csv(sandbox, day.isoformat())
    assert parse_settlement_csv(same_day) == [row]
    _, other_day = await settlement_csv(sandbox, (day - timedelta(days=1)).isoformat())
    assert other_day.strip() == HEADER
    async with sandbox.http.get(
        f"{sandbox.base_url}/sandbox/settlement", params={"date": "01/05/2024"}
    ) as resp:
        assert resp.status == 400


async def test_report_uses_configured_fees_and_failed_refund_status() -> None:
    async with running_sandbox(fee_bps=150, fee_fixed=0) as box:
        _, pi, _ = await box.post(
            "/v1/payment_intents",
            {**INTENT, "payment_method": "tok_refundFail", "capture_method": "automatic"},
        )
        _, refund, _ = await box.post("/v1/refunds", {"payment_intent": pi["id"]})
        _, payout, _ = await box.post(
            "/v1/payouts", {"amount": 300, "currency": "eur", "destination": "btok_fail"}
        )

        async def payout_failed() -> bool:
            _, body = await box.get(f"/v1/payouts/{payout['id']}")
            return bool(body["status"] == "failed")

        await wait_until(payout_failed)
        _, text = await settlement_csv(box)
        by_key = {(r.type, r.reference): r for r in parse_settlement_csv(text)}
        assert by_key[("charge", pi["id"])].fee == 38  # 2500 * 1.5% = 37.5 -> 38
        assert by_key[("refund", refund["id"])].status == "failed"
        assert by_key[("payout", payout["id"])].status == "failed"
