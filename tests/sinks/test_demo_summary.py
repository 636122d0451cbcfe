"""The demo's run summary counts every capture: automatic ones and captures of holds."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import asyncpg
from rich.console import Console

from config.settings import Settings
from ops.demo import wait_and_summarise
from sinks import ledger

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
M = "m_demo_summary"


async def test_summary_captured_includes_captures_of_manual_holds(
    ledger_conn: asyncpg.Connection, ledger_dsn: str
) -> None:
    common = {"merchant_id": M, "currency": "USD", "occurred_at": T0}
    await ledger.post_captures(ledger_conn, [ledger.CapturePosting(
        event_id="e_auto", payment_id="p_auto", amount=1_000, fee=30, **common)])
    await ledger.post_authorizations(ledger_conn, [ledger.AuthorizationHold(
        event_id="e_hold", payment_id="p_manual", amount=2_000, **common)])
    await ledger.post_hold_captures(ledger_conn, [ledger.HoldCapture(
        event_id="e_capture", payment_id="p_manual", amount=2_000, fee=60, **common)])

    out = io.StringIO()
    result = await wait_and_summarise(
        Settings(pg_dsn=ledger_dsn), "nosuchrun", 0, 1.0, Console(file=out, width=200)
    )
    assert result.ledger_ok
    [row] = [line for line in out.getvalue().splitlines() if line.strip("│ ").startswith("USD")]
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    # captured = fees + what the wallets got: 3,000 = 90 + 2,910
    assert cells == ["USD", "30.00 USD", "0.90 USD", "29.10 USD"]
