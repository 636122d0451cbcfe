"""``paystream webhooks``: endpoints, deliveries and replay, with typer's CliRunner against
PostgreSQL, and a real dispatcher sending to a real local receiver."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from config.settings import get_settings
from ops.stack import free_port
from ops.webhooks_cli import webhooks_app
from paystream.webhooks import verify_signature
from schemas.events import PaymentEvent
from sinks.webhook_dispatcher import WebhookDispatcher
from sinks.webhook_outbox import enqueue_deliveries
from tests.sinks.test_webhook_delivery import (
    Call,
    Receiver,
    isolated_database,
    make_event,
    receiving,
    unique,
    wait_until,
    webhook_settings,
)


@pytest.fixture(scope="module")
async def dsn(pg_dsn: str) -> AsyncIterator[str]:
    async with isolated_database(pg_dsn) as created:
        yield created


@pytest.fixture()
def cli(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("PAYSTREAM_PG_DSN", dsn)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: room for whole ids
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def run(runner: CliRunner, *args: str, code: int = 0) -> str:
    result = runner.invoke(webhooks_app, list(args))
    assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{result.output}"
    return result.output


def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    return asyncio.run(go())


def added(output: str) -> tuple[int, str]:
    endpoint_id = re.search(r"endpoint id: (\d+)", output)
    secret = re.search(r"secret: (whsec_\S+)", output)
    assert endpoint_id and secret, output
    return int(endpoint_id.group(1)), secret.group(1)


def enqueue(dsn: str, events: list[PaymentEvent]) -> int:
    async def go() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                return await enqueue_deliveries(conn, events)
        finally:
            await conn.close()

    return asyncio.run(go())


def deliver(dsn: str, merchant: str, port: int, receiver: Receiver) -> list[Call]:
    """Run a dispatcher until every delivery of ``merchant`` is delivered; what arrived."""

    async def go() -> list[Call]:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        try:
            async with receiving(receiver, port), WebhookDispatcher(
                pool, webhook_settings(dsn)
            ) as dispatcher:

                async def done() -> bool:
                    await dispatcher.run_once()
                    pending = await pool.fetchval(
                        "SELECT count(*) FROM webhook_deliveries "
                        "WHERE merchant_id = $1 AND status <> 'delivered'",
                        merchant,
                    )
                    return bool(pending == 0)

                await wait_until(done)
        finally:
            await pool.close()
        return list(receiver.calls)

    return asyncio.run(go())


def snapshot(dsn: str, merchant: str) -> list[tuple[Any, ...]]:
    rows = query(
        dsn,
        "SELECT id, status, attempts, schedule_offset, next_attempt_at, last_status_code, "
        "delivered_at FROM webhook_deliveries WHERE merchant_id = $1 ORDER BY id",
        merchant,
    )
    return [tuple(r) for r in rows]


# ----------------------------------------------------------------------------- endpoints
def test_endpoints_add_list_rotate_disable_enable(cli: CliRunner, dsn: str) -> None:
    merchant = unique("m")
    out = run(
        cli, "endpoints", "add", "--merchant", merchant, "--url", "https://shop.example/hooks",
        "--events", "payment.captured,payment.refunded",
    )
    endpoint_id, secret = added(out)
    [row] = query(dsn, "SELECT * FROM merchant_endpoints WHERE id = $1", endpoint_id)
    assert row["secret"] == secret
    assert row["merchant_id"] == merchant
    assert list(row["event_types"]) == ["payment.captured", "payment.refunded"]

    listed = run(cli, "endpoints", "list", "--merchant", merchant)
    assert "https://shop.example/hooks" in listed
    assert str(endpoint_id) in listed
    assert "payment.captured,payment.refunded" in listed
    assert secret not in listed

    rotated = run(cli, "endpoints", "rotate-secret", str(endpoint_id), "--overlap-hours", "2")
    _, new_secret = added(rotated)
    assert new_secret != secret
    [row] = query(dsn, "SELECT * FROM merchant_endpoints WHERE id = $1", endpoint_id)
    assert (row["secret"], row["previous_secret"]) == (new_secret, secret)
    window = row["previous_secret_expires_at"] - datetime.now(UTC)
    assert timedelta(hours=1) < window <= timedelta(hours=2)

    assert "disabled" in run(cli, "endpoints", "disable", str(endpoint_id))
    [row] = query(dsn, "SELECT enabled FROM merchant_endpoints WHERE id = $1", endpoint_id)
    assert row["enabled"] is False
    assert "enabled" in run(cli, "endpoints", "enable", str(endpoint_id))
    [row] = query(dsn, "SELECT enabled FROM merchant_endpoints WHERE id = $1", endpoint_id)
    assert row["enabled"] is True
    run(cli, "endpoints", "disable", str(endpoint_id))


def test_endpoints_errors(cli: CliRunner) -> None:
    out = run(
        cli, "endpoints", "add", "--merchant", "m", "--url", "https://x.example",
        "--events", "payment.nope", code=1,
    )
    assert "unknown event type" in out
    assert "http(s)" in run(
        cli, "endpoints", "add", "--merchant", "m", "--url", "ftp://x.example", code=1
    )
    assert "no webhook endpoint" in run(cli, "endpoints", "disable", "999999999", code=1)


def test_cli_needs_a_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYSTREAM_PG_DSN", "embedded")
    get_settings.cache_clear()
    try:
        out = run(CliRunner(), "endpoints", "list", code=2)
    finally:
        get_settings.cache_clear()
    assert "PAYSTREAM_PG_DSN" in out


# ----------------------------------------------------------------------------- deliveries + replay
def test_deliveries_and_replay(cli: CliRunner, dsn: str) -> None:
    merchant = unique("m")
    port = free_port()
    endpoint_id, secret = added(
        run(cli, "endpoints", "add", "--merchant", merchant,
            "--url", f"http://127.0.0.1:{port}/hooks")
    )
    event, other = make_event(merchant), make_event(merchant)
    assert enqueue(dsn, [event, other]) == 2
    # The endpoint fails the first request, then recovers.
    first = deliver(dsn, merchant, port, Receiver(answer=lambda n: 500 if n == 0 else 200))
    assert len(first) == 3

    shown = run(cli, "deliveries", "--payment", event.payment_id)
    assert event.event_id in shown
    assert "delivered" in shown
    assert "1 webhook delivery" in shown
    attempts_of_event = [c.answered for c in first if c.event_id == event.event_id]
    expected_log = " ".join(f"{n}:{s}" for n, s in enumerate(attempts_of_event, start=1))
    assert expected_log in shown
    assert other.event_id not in shown
    assert event.event_id in run(cli, "deliveries", "--event-id", event.event_id)
    assert "0 webhook delivery" in run(
        cli, "deliveries", "--event-id", event.event_id, "--status", "dead"
    )
    run(cli, "deliveries", "--status", "lost", code=2)

    # Dry run: reports, changes nothing.
    before = snapshot(dsn, merchant)
    dry = run(cli, "replay", "--event-id", event.event_id)
    assert "dry run" in dry
    assert event.event_id in dry
    assert "1 delivery(ies) would be sent again" in dry
    assert snapshot(dsn, merchant) == before

    # Execute: back to pending, due now; attempts keep counting.
    done = run(cli, "replay", "--event-id", event.event_id, "--execute")
    assert "1 delivery(ies) set back to pending" in done
    [row] = query(
        dsn, "SELECT * FROM webhook_deliveries WHERE event_id = $1", event.event_id
    )
    prior = len(attempts_of_event)
    assert (row["status"], row["attempts"], row["schedule_offset"]) == ("pending", prior, prior)
    assert row["next_attempt_at"] <= datetime.now(UTC)

    resent = deliver(dsn, merchant, port, Receiver())
    [call] = resent  # only the replayed event
    assert call.event_id == event.event_id
    assert call.attempt == prior + 1
    assert verify_signature(call.body, call.signature, secret)["event_id"] == event.event_id
    logged = query(
        dsn,
        "SELECT a.attempt, a.status_code FROM webhook_attempts a "
        "JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.event_id = $1 "
        "ORDER BY a.attempt",
        event.event_id,
    )
    assert [(r["attempt"], r["status_code"]) for r in logged] == [
        *((n, s) for n, s in enumerate(attempts_of_event, start=1)),
        (prior + 1, 200),
    ]

    # Other selections.
    by_payment = run(cli, "replay", "--payment", other.payment_id)
    assert "1 delivery(ies) would be sent again" in by_payment
    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    by_time = run(cli, "replay", "--since", since, "--endpoint", str(endpoint_id))
    assert "2 delivery(ies) would be sent again" in by_time
    assert "no webhook deliveries match" in run(
        cli, "replay", "--payment", event.payment_id, "--endpoint", str(endpoint_id + 1000)
    )
    run(cli, "endpoints", "disable", str(endpoint_id))
    assert "disabled endpoint" in run(cli, "replay", "--payment", event.payment_id)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--until", "2024-01-01T00:00:00Z"],
        ["--event-id", "evt_1", "--payment", "pay_1"],
        ["--since", "2024-01-02T00:00:00+00:00", "--until", "2024-01-01T00:00:00+00:00"],
        ["--since", "yesterday"],
    ],
)
def test_replay_needs_exactly_one_selection(cli: CliRunner, args: list[str]) -> None:
    run(cli, "replay", *args, code=2)


# ----------------------------------------------------------------------------- docs
def test_docs_publish_the_default_retry_schedule() -> None:
    """docs/webhooks.md's schedule table is the default PAYSTREAM_WEBHOOK_RETRY_SCHEDULE."""
    from pathlib import Path

    from config.settings import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    units = {"min": 60, "h": 3600}
    waits: list[float] = []
    for match in re.finditer(r"^\| (\d+) \| (\d+) (min|h) \|", doc, flags=re.MULTILINE):
        waits.append(float(match.group(2)) * units[match.group(3)])
    default = Settings.model_fields["webhook_retry_schedule_seconds"].default
    assert waits == default
    assert f"| {len(default) + 1} |" in doc  # the last attempt's row
