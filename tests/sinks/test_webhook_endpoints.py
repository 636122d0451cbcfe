"""Webhook endpoints (add, list, rotate, disable) and the outbox enqueue, on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sinks.webhook_endpoints import (
    EndpointError,
    add_endpoint,
    disable_endpoint,
    enable_endpoint,
    get_endpoint,
    list_endpoints,
    redact_url,
    rotate_secret,
)
from sinks.webhook_outbox import enqueue_deliveries, list_attempts, list_deliveries
from tests.sinks.test_webhook_delivery import isolated_database, make_event, unique

URL = "https://merchant.example/hooks"


@pytest.fixture(scope="module")
async def dsn(pg_dsn: str) -> AsyncIterator[str]:
    async with isolated_database(pg_dsn) as created:
        yield created


@pytest.fixture()
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def deliveries(conn: asyncpg.Connection, merchant_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        """
        SELECT id, event_id, endpoint_id, payment_id, merchant_id, event_type, payload,
               status, attempts, next_attempt_at, created_at
          FROM webhook_deliveries WHERE merchant_id = $1 ORDER BY id
        """,
        merchant_id,
    )
    return rows


# ----------------------------------------------------------------------------- endpoints
async def test_add_generates_a_secret_and_list_never_shows_it(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    first = await add_endpoint(conn, merchant, URL, ["payment.captured", "payment.captured"])
    second = await add_endpoint(conn, merchant, URL + "/all")
    assert first.secret.startswith("whsec_") and len(first.secret) > 30
    assert first.secret != second.secret
    assert first.endpoint.event_types == ["payment.captured"]
    assert second.endpoint.event_types == []  # every event type
    assert first.endpoint.enabled and first.endpoint.created_at.tzinfo is not None
    listed = await list_endpoints(conn, merchant)
    assert [e.id for e in listed] == [first.endpoint.id, second.endpoint.id]
    assert all("secret" not in e.model_dump() for e in listed)
    assert first.secret not in repr(listed)
    assert {e.merchant_id for e in await list_endpoints(conn)} >= {merchant}
    stored = await conn.fetchval(
        "SELECT secret FROM merchant_endpoints WHERE id = $1", first.endpoint.id
    )
    assert stored == first.secret


@pytest.mark.parametrize(
    ("url", "events"),
    [
        ("ftp://merchant.example/hooks", None),
        ("not a url", None),
        ("https:///no-host", None),
        ("http://merchant.example:notaport/x", None),
        (URL, ["payment.exploded"]),
    ],
)
async def test_add_refuses_bad_urls_and_event_types(
    conn: asyncpg.Connection, url: str, events: list[str] | None
) -> None:
    with pytest.raises(EndpointError):
        await add_endpoint(conn, unique("m"), url, events)


async def test_rotate_keeps_the_previous_secret_for_the_overlap(
    conn: asyncpg.Connection,
) -> None:
    created = await add_endpoint(conn, unique("m"), URL)
    before = datetime.now(UTC)
    rotated = await rotate_secret(conn, created.endpoint.id, timedelta(hours=24))
    row = await conn.fetchrow(
        "SELECT secret, previous_secret, previous_secret_expires_at FROM merchant_endpoints "
        "WHERE id = $1",
        created.endpoint.id,
    )
    assert row["secret"] == rotated.secret != created.secret
    assert row["previous_secret"] == created.secret
    assert row["previous_secret_expires_at"] == rotated.previous_secret_expires_at
    assert rotated.previous_secret_expires_at > before + timedelta(hours=23)
    assert rotated.endpoint.previous_secret_expires_at == rotated.previous_secret_expires_at
    # Rotating again keeps only the latest previous secret.
    again = await rotate_secret(conn, created.endpoint.id)
    row = await conn.fetchrow(
        "SELECT secret, previous_secret FROM merchant_endpoints WHERE id = $1",
        created.endpoint.id,
    )
    assert (row["secret"], row["previous_secret"]) == (again.secret, rotated.secret)
    with pytest.raises(EndpointError):
        await rotate_secret(conn, created.endpoint.id, timedelta(hours=-1))


async def test_unknown_endpoint_ids_are_errors(conn: asyncpg.Connection) -> None:
    missing = 10**12
    for action in (rotate_secret, disable_endpoint, enable_endpoint, get_endpoint):
        with pytest.raises(EndpointError, match="no webhook endpoint"):
            await action(conn, missing)  # type: ignore[operator]


async def test_disable_and_enable(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    created = await add_endpoint(conn, merchant, URL)
    assert not (await disable_endpoint(conn, created.endpoint.id)).enabled
    assert not (await get_endpoint(conn, created.endpoint.id)).enabled
    assert await enqueue_deliveries(conn, [make_event(merchant)]) == 0
    assert (await enable_endpoint(conn, created.endpoint.id)).enabled
    assert await enqueue_deliveries(conn, [make_event(merchant)]) == 1


def test_redact_url_drops_credentials_and_query() -> None:
    assert (
        redact_url("https://u:p@h.example:8443/a/b?token=x&v=1#f")
        == "https://u:***@h.example:8443/a/b?token=***&v=***"
    )
    assert redact_url("http://h.example/x") == "http://h.example/x"


# ----------------------------------------------------------------------------- outbox
async def test_enqueue_fans_out_to_subscribed_endpoints_only(conn: asyncpg.Connection) -> None:
    merchant, other = unique("m"), unique("m")
    everything = await add_endpoint(conn, merchant, URL + "/all")
    captures = await add_endpoint(conn, merchant, URL + "/cap", ["payment.captured"])
    disabled = await add_endpoint(conn, merchant, URL + "/off")
    await disable_endpoint(conn, disabled.endpoint.id)
    await add_endpoint(conn, other, URL + "/other")
    captured = make_event(merchant, "payment.captured")
    declined = make_event(merchant, "payment.declined")
    before = await conn.fetchval("SELECT now()")
    assert await enqueue_deliveries(conn, [captured, declined]) == 3
    rows = await deliveries(conn, merchant)
    pairs = {(r["event_id"], r["endpoint_id"]) for r in rows}
    assert pairs == {
        (captured.event_id, everything.endpoint.id),
        (captured.event_id, captures.endpoint.id),
        (declined.event_id, everything.endpoint.id),
    }
    for row in rows:
        event = captured if row["event_id"] == captured.event_id else declined
        assert bytes(row["payload"]) == event.model_dump_json().encode()
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert row["payment_id"] == event.payment_id
        assert row["event_type"] == event.type
        assert row["next_attempt_at"] <= await conn.fetchval("SELECT now()")  # due now
        assert row["next_attempt_at"] >= before
    assert await deliveries(conn, other) == []


async def test_enqueue_is_idempotent(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    await add_endpoint(conn, merchant, URL)
    await add_endpoint(conn, merchant, URL + "/2")
    events = [make_event(merchant) for _ in range(3)]
    assert await enqueue_deliveries(conn, events) == 6
    first = await deliveries(conn, merchant)
    # The same batch again (a redelivered batch), and the events as replays: nothing new.
    assert await enqueue_deliveries(conn, events) == 0
    replays = [e.model_copy(update={"replayed": True, "command_id": "cmd_x"}) for e in events]
    assert await enqueue_deliveries(conn, replays + events) == 0
    assert await deliveries(conn, merchant) == first


async def test_enqueue_in_a_batch_prefers_the_original_and_handles_duplicates(
    conn: asyncpg.Connection,
) -> None:
    merchant = unique("m")
    await add_endpoint(conn, merchant, URL)
    event = make_event(merchant)
    replay = event.model_copy(update={"replayed": True})
    assert await enqueue_deliveries(conn, [replay, event, event]) == 1
    [row] = await deliveries(conn, merchant)
    assert bytes(row["payload"]) == event.model_dump_json().encode()


async def test_a_replayed_event_alone_is_delivered_when_the_original_never_was(
    conn: asyncpg.Connection,
) -> None:
    merchant = unique("m")
    await add_endpoint(conn, merchant, URL)
    replay = make_event(merchant, replayed=True)
    assert await enqueue_deliveries(conn, [replay]) == 1


async def test_enqueue_a_full_batch_in_one_statement(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    await add_endpoint(conn, merchant, URL)
    events = [make_event(merchant) for _ in range(500)]
    async with conn.transaction():
        assert await enqueue_deliveries(conn, events) == 500
    assert await enqueue_deliveries(conn, []) == 0
    assert await enqueue_deliveries(conn, [make_event(unique("nobody"))]) == 0


async def test_enqueue_rolls_back_with_the_ledger_transaction(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    await add_endpoint(conn, merchant, URL)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with conn.transaction():
            assert await enqueue_deliveries(conn, [make_event(merchant)]) == 1
            raise Boom
    assert await deliveries(conn, merchant) == []


async def test_list_deliveries_and_attempts(conn: asyncpg.Connection) -> None:
    merchant = unique("m")
    created = await add_endpoint(conn, merchant, URL)
    event = make_event(merchant)
    await enqueue_deliveries(conn, [event, make_event(merchant)])
    [found] = await list_deliveries(conn, payment_id=event.payment_id)
    assert found.event_id == event.event_id
    assert found.endpoint_id == created.endpoint.id
    assert found.endpoint_url == URL
    assert found.status == "pending"
    assert len(await list_deliveries(conn, merchant_id=merchant)) == 2
    assert await list_deliveries(conn, merchant_id=merchant, status="dead") == []
    assert [d.id for d in await list_deliveries(conn, event_id=event.event_id)] == [found.id]
    assert await list_attempts(conn, [found.id]) == {found.id: []}
