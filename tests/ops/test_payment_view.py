"""`paystream status` combined view against a real PostgreSQL and Redis.

The payment's parts are written with the real writers (status sink and its event log,
ledger functions, attempt claims, webhook outbox rows), then read back by the view. Ids are
unique per test, so the session database and Redis db 15 can be shared.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from rich.console import Console

from agents.executor import attempt_id
from config.settings import EMBEDDED, Settings
from ops.payment_view import (
    PaymentView,
    PaymentViewError,
    gather_payment_view,
    local_service_settings,
    render_payment_view,
)
from ops.stack import free_port
from psp.claims import AttemptClaims
from schemas.events import PaymentEvent
from sinks import ledger, status
from sinks.migrations import migrate
from tests.conftest import REDIS_URL, _reachable

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture()
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    if pg_dsn == EMBEDDED:
        pytest.skip("needs a PostgreSQL server")
    conn = await asyncpg.connect(pg_dsn)
    try:
        await migrate(conn)
        yield conn
    finally:
        await conn.close()


@pytest.fixture()
def settings(pg_dsn: str, tmp_path: Path) -> Settings:
    if not _reachable(REDIS_URL, 6379):
        pytest.skip("needs Redis")
    return Settings(
        pg_dsn=pg_dsn,
        redis_url=REDIS_URL,
        data_dir=tmp_path,
        app_id=f"pv-test-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture()
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{settings.app_id}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def _event(payment_id: str, merchant_id: str, seq: int, event_type: str, state: str,
           **fields: Any) -> PaymentEvent:
    return PaymentEvent.model_validate({
        "type": event_type,
        "event_id": f"evt_{payment_id}_{seq}",
        "payment_id": payment_id,
        "merchant_id": merchant_id,
        "command_id": f"cmd_{seq}",
        "idempotency_key": f"idem_{payment_id}_{seq}",
        "status": state,
        "amount": 10_000,
        "currency": "USD",
        "occurred_at": T0 + timedelta(seconds=seq),
        "sequence": seq,
        "psp": "alpha",
        "psp_reference": f"pi_{payment_id}",
        "capture_method": "manual",
        **fields,
    })


def _story(payment_id: str, merchant_id: str) -> list[PaymentEvent]:
    return [
        _event(payment_id, merchant_id, 1, "payment.authorized", "authorized"),
        _event(payment_id, merchant_id, 2, "payment.captured", "captured",
               amount_captured=10_000, amount_captured_now=10_000, fee=320),
        _event(payment_id, merchant_id, 3, "payment.refunded", "partially_refunded",
               amount_captured=10_000, amount_refunded=2_500, amount_refunded_now=2_500,
               refund_id="re_1"),
    ]


async def _post_ledger(conn: asyncpg.Connection, payment_id: str, merchant_id: str) -> None:
    common: dict[str, Any] = {"merchant_id": merchant_id, "currency": "USD", "occurred_at": T0}
    async with conn.transaction():
        result = await ledger.post_authorizations(conn, [ledger.AuthorizationHold(
            event_id=f"evt_{payment_id}_1", payment_id=payment_id, amount=10_000, **common)])
        assert result.posted == 1, result
        result = await ledger.post_hold_captures(conn, [ledger.HoldCapture(
            event_id=f"evt_{payment_id}_2", payment_id=payment_id, amount=10_000, fee=320,
            **common)])
        assert result.posted == 1, result
        result = await ledger.post_refunds(conn, [ledger.RefundPosting(
            event_id=f"evt_{payment_id}_3", payment_id=payment_id, refund_id="re_1",
            amount=2_500, **common)])
        assert result.posted == 1, result


async def _webhooks(conn: asyncpg.Connection, payment_id: str, merchant_id: str) -> list[int]:
    """Two outbox rows (delivered after a retry, and dead) in migration 0005's tables."""
    endpoint = await conn.fetchval(
        "INSERT INTO merchant_endpoints (merchant_id, url, secret, enabled) "
        "VALUES ($1, 'http://127.0.0.1:9/hooks', 'whsec_test', false) RETURNING id",
        merchant_id,
    )
    delivered = await conn.fetchval(
        """INSERT INTO webhook_deliveries (event_id, endpoint_id, payment_id, merchant_id,
               event_type, payload, status, attempts, last_status_code, created_at,
               delivered_at)
           VALUES ($1, $2, $3, $4, 'payment.captured', '{}'::bytea, 'delivered', 2, 200,
                   $5, $6) RETURNING id""",
        f"evt_{payment_id}_2", endpoint, payment_id, merchant_id, T0, T0 + timedelta(minutes=1),
    )
    dead = await conn.fetchval(
        """INSERT INTO webhook_deliveries (event_id, endpoint_id, payment_id, merchant_id,
               event_type, payload, status, attempts, last_status_code, last_error,
               created_at)
           VALUES ($1, $2, $3, $4, 'payment.refunded', '{}'::bytea, 'dead', 10, NULL,
                   'connect timeout [retries exhausted]', $5) RETURNING id""",
        f"evt_{payment_id}_3", endpoint, payment_id, merchant_id, T0 + timedelta(seconds=3),
    )
    await conn.executemany(
        "INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, "
        "latency_ms, error) VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (delivered, 1, T0, 500, 12.5, "HTTP 500"),
            (delivered, 2, T0 + timedelta(minutes=1), 200, 8.0, None),
        ],
    )
    return [int(delivered), int(dead)]


async def test_the_view_lists_each_event_once(
    db: asyncpg.Connection, settings: Settings, redis_client: aioredis.Redis
) -> None:
    payment_id = f"pay_log_{uuid.uuid4().hex[:8]}"
    events = _story(payment_id, "m_log")
    # A batch may carry an event twice (a replay next to its original), and a batch may be
    # redelivered: the status sink's log (payment_events) keeps one row per event id.
    async with db.transaction():  # inside the sink's transaction, as the sink calls it
        await status.apply_events(db, [*events, events[0]])
    await status.apply_events(db, events)
    await status.apply_events(db, [])
    newer = _event(payment_id, "m_log", 4, "payment.refunded", "refunded",
                   amount_captured=10_000, amount_refunded=10_000, refund_id="re_2")
    await status.apply_events(db, [events[2], newer])

    view = await gather_payment_view(settings, payment_id)
    assert view.events == [*events, newer]
    assert view.status is not None and view.status["event_id"] == newer.event_id


async def test_gather_and_render_the_whole_payment(
    db: asyncpg.Connection, settings: Settings, redis_client: aioredis.Redis
) -> None:
    payment_id = f"pay_view_{uuid.uuid4().hex[:8]}"
    merchant_id = f"m_view_{uuid.uuid4().hex[:6]}"
    events = _story(payment_id, merchant_id)
    # A payment whose id extends this one's: its events and attempts must not show up.
    neighbour = f"{payment_id}_2"

    await status.apply_events(db, events)  # the status read model and its event log
    await status.apply_events(db, events)  # a redelivered batch
    await status.apply_events(db, [_event(neighbour, merchant_id, 1, "payment.authorized",
                                          "authorized")])
    await _post_ledger(db, payment_id, merchant_id)
    delivery_ids = await _webhooks(db, payment_id, merchant_id)

    claims = AttemptClaims(redis_client, key_prefix=settings.app_id)
    assert await claims.claim(attempt_id(payment_id, "authorize", 1), "alpha") == "alpha"
    assert await claims.claim(attempt_id(payment_id, "capture", 2), "alpha") == "alpha"
    assert await claims.claim(attempt_id(payment_id, "capture", 1), "beta") == "beta"
    assert await claims.claim(attempt_id(payment_id, "refund", "re_1"), "alpha") == "alpha"
    await claims.claim(attempt_id(neighbour, "authorize", 1), "beta")

    view = await gather_payment_view(settings, payment_id)

    assert view.found and view.notes == []
    assert view.status is not None
    assert (view.status["status"], view.status["amount_refunded"]) == ("partially_refunded", 2500)
    assert view.events == events  # no duplicates, in sequence order

    assert [(a.operation, a.number, a.psp) for a in view.attempts] == [
        ("authorize", "1", "alpha"),
        ("capture", "1", "beta"),
        ("capture", "2", "alpha"),
        ("refund", "re_1", "alpha"),
    ]
    assert all(a.attempt_id.startswith(f"att_{payment_id}_") for a in view.attempts)
    assert all(0 < (a.expires_in_seconds or 0) for a in view.attempts)

    kinds = {e.kind for e in view.ledger_entries}
    assert kinds == {"authorization", "hold_capture", "refund"}
    assert {e.event_id for e in view.ledger_entries} == {e.event_id for e in events}
    per_transaction: dict[int, int] = {}
    for entry in view.ledger_entries:
        per_transaction[entry.transaction_id] = (
            per_transaction.get(entry.transaction_id, 0) + entry.amount
        )
    assert len(per_transaction) == 3 and set(per_transaction.values()) == {0}
    wallet = f"merchant:{merchant_id}:available:USD"
    assert sum(e.amount for e in view.ledger_entries if e.account == wallet) == -(
        10_000 - 320 - 2_500
    )
    refund = next(e for e in view.ledger_entries if e.kind == "refund")
    assert refund.reference == "re_1"

    assert [d.id for d in view.webhook_deliveries] == delivery_ids
    delivered, dead = view.webhook_deliveries
    assert (delivered.status, delivered.attempts, delivered.last_status_code) == (
        "delivered", 2, 200
    )
    assert [(a.attempt, a.status_code) for a in delivered.attempt_log] == [(1, 500), (2, 200)]
    assert (dead.status, dead.last_error, dead.attempt_log) == (
        "dead", "connect timeout [retries exhausted]", []
    )

    assert PaymentView.model_validate_json(view.model_dump_json()) == view

    console = Console(record=True, width=240)
    render_payment_view(view, console)
    text = console.export_text()
    for expected in (
        payment_id,
        "partially_refunded",
        "payment.authorized",
        "payment.captured",
        "payment.refunded",
        f"att_{payment_id}_refund_re_1",
        "beta",
        "hold_capture",
        wallet,
        "100.00 USD",
        "25.00 USD",
        "delivered",
        "dead",
        "connect timeout [retries exhausted]",  # markup-like text printed as it is
        "HTTP 500",
    ):
        assert expected in text, expected
    assert f"att_{neighbour}_" not in text


async def test_an_unknown_payment_is_an_empty_view(
    db: asyncpg.Connection, settings: Settings, redis_client: aioredis.Redis
) -> None:
    view = await gather_payment_view(settings, f"pay_none_{uuid.uuid4().hex[:8]}")
    assert not view.found
    assert (view.status, view.events, view.attempts, view.ledger_entries,
            view.webhook_deliveries) == (None, [], [], [], [])
    console = Console(record=True, width=200)
    render_payment_view(view, console)
    assert "no payment" in console.export_text()


async def test_redis_down_leaves_a_note_and_the_rest_of_the_view(
    db: asyncpg.Connection, settings: Settings
) -> None:
    payment_id = f"pay_noredis_{uuid.uuid4().hex[:8]}"
    events = _story(payment_id, "m_noredis")
    await status.apply_events(db, events)
    offline = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    view = await gather_payment_view(offline, payment_id)
    assert view.events == events
    assert view.attempts == []
    assert len(view.notes) == 1 and "Redis unavailable" in view.notes[0]
    console = Console(record=True, width=200)
    render_payment_view(view, console)
    assert "Redis unavailable" in console.export_text()


def test_embedded_settings_resolve_to_the_local_stack(tmp_path: Path) -> None:
    embedded = Settings(
        kafka_bootstrap_servers=EMBEDDED, pg_dsn="postgresql://x@db/y", redis_url=EMBEDDED,
        embedded_kafka_port=19999, embedded_redis_port=16399, data_dir=tmp_path,
    )
    resolved = local_service_settings(embedded)
    assert resolved.kafka_bootstrap_servers == "127.0.0.1:19999"
    assert resolved.redis_url == "redis://127.0.0.1:16399/0"
    assert resolved.pg_dsn == "postgresql://x@db/y"

    no_stack = embedded.model_copy(update={"pg_dsn": EMBEDDED})
    with pytest.raises(PaymentViewError, match="no embedded PostgreSQL"):
        local_service_settings(no_stack)
