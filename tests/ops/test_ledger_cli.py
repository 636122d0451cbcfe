"""`paystream ledger balance / statement / verify` against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime

import asyncpg
import pytest
from typer.testing import CliRunner

from config.settings import EMBEDDED, get_settings
from ops.cli import app
from sinks import ledger
from sinks.migrations import migrate


@pytest.fixture()
def posted(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if pg_dsn == EMBEDDED:
        pytest.skip("needs a PostgreSQL server")

    async def setup() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await migrate(conn)
            await ledger.post_captures(conn, [ledger.CapturePosting(
                event_id="evt_cli_1", payment_id="pay_cli_1", merchant_id="m_cli",
                amount=10_000, fee=320, currency="USD", occurred_at=datetime.now(UTC))])
        finally:
            await conn.close()

    asyncio.run(setup())
    monkeypatch.setenv("PAYSTREAM_PG_DSN", pg_dsn)
    get_settings.cache_clear()
    yield "m_cli"
    get_settings.cache_clear()


def test_balance_statement_and_verify(posted: str) -> None:
    runner = CliRunner()
    balance = runner.invoke(app, ["ledger", "balance", "--merchant", posted])
    assert balance.exit_code == 0, balance.output
    assert "96.80 USD" in balance.output

    statement = runner.invoke(app, ["ledger", "statement", "--merchant", posted])
    assert statement.exit_code == 0, statement.output
    rows = list(csv.DictReader(io.StringIO(statement.output)))
    assert len(rows) == 1
    assert "9680" in rows[0].values()

    verify = runner.invoke(app, ["ledger", "verify"])
    assert verify.exit_code == 0, verify.output
    assert "ledger balanced: yes" in verify.output
