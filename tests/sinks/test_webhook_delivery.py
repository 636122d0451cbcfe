"""Merchant webhook delivery end to end: outbox rows in PostgreSQL, a real dispatcher, and a
real aiohttp receiver on a local port (no HTTP mocks). Waits poll a condition with a
timeout; nothing asserts on timing.

The module runs on its own database (created on the server of the session's ``pg_dsn``),
so no other dispatcher (a session worker sharing ``pg_dsn``) claims these deliveries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from config.settings import EMBEDDED, Settings
from ops.stack import free_port
from paystream.webhooks import SignatureError, verify_signature
from schemas.dlq import DlqEnvelope
from schemas.events import PaymentEvent, derive_event_id
from sinks.migrations import migrate
from sinks.webhook_dispatcher import DeadDelivery, WebhookDispatcher, kafka_dead_letter
from sinks.webhook_endpoints import add_endpoint, disable_endpoint, rotate_secret
from sinks.webhook_outbox import enqueue_deliveries
from topics.catalog import EVENTS, WEBHOOKS_DLQ

WAIT_S = 30.0


# ----------------------------------------------------------------------------- helpers
def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def make_event(
    merchant_id: str,
    event_type: str = "payment.captured",
    payment_id: str | None = None,
    replayed: bool = False,
) -> PaymentEvent:
    payment = payment_id or unique("pay")
    key = f"{payment}-key"
    status = {
        "payment.captured": "captured",
        "payment.authorized": "authorized",
        "payment.declined": "declined",
    }[event_type]
    return PaymentEvent(
        type=event_type,  # type: ignore[arg-type]
        event_id=derive_event_id(merchant_id, payment, key, event_type),
        payment_id=payment,
        merchant_id=merchant_id,
        command_id=unique("cmd"),
        idempotency_key=key,
        status=status,  # type: ignore[arg-type]
        amount=1999,
        currency="USD",
        amount_captured=1999 if event_type == "payment.captured" else 0,
        occurred_at=datetime.now(UTC),
        replayed=replayed,
    )


def _dsn_with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


@asynccontextmanager
async def isolated_database(pg_dsn: str, migrated: bool = True) -> AsyncIterator[str]:
    """A (migrated) database of its own on ``pg_dsn``'s server (dropped afterwards)."""
    if pg_dsn == EMBEDDED:
        pytest.skip("needs a PostgreSQL server (PAYSTREAM_TEST_PG_DSN)")
    name = f"paystream_wh_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _dsn_with_database(pg_dsn, name)
    try:
        if migrated:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def wait_until(
    check: Callable[[], Awaitable[Any]], within: float = WAIT_S, every: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    pytest.fail(f"condition not met within {within}s (last value: {last!r})")


@dataclass
class Call:
    """One request the receiver got, and what it answered."""

    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def event_id(self) -> str:
        return self.headers["Paystream-Event-Id"]

    @property
    def attempt(self) -> int:
        return int(self.headers["Paystream-Delivery-Attempt"])

    @property
    def signature(self) -> str:
        return self.headers["Paystream-Signature"]


@dataclass
class Receiver:
    """A merchant's webhook endpoint on a local port. ``answer(n)`` gives the status of the
    n-th request (0-based); while ``gate`` is set to an unset event, requests wait on it."""

    answer: Callable[[int], int] = lambda _n: 200
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    gate: asyncio.Event | None = None
    port: int = 0
    _requests: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            index = self._requests
            self._requests += 1
            body = await request.read()
            if self.gate is not None:
                await self.gate.wait()
            status = self.answer(index)
            self.calls.append(Call(dict(request.headers), body, status))
            return web.Response(status=status, text="ok" if status < 300 else "nope")
        finally:
            self.in_flight -= 1

    async def start(self, port: int | None = None) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = port or free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def by_event(self) -> dict[str, list[Call]]:
        found: dict[str, list[Call]] = {}
        for call in self.calls:
            found.setdefault(call.event_id, []).append(call)
        return found


@asynccontextmanager
async def receiving(receiver: Receiver, port: int | None = None) -> AsyncIterator[Receiver]:
    await receiver.start(port)
    try:
        yield receiver
    finally:
        await receiver.stop()


@asynccontextmanager
async def dispatching(dispatcher: WebhookDispatcher) -> AsyncIterator[WebhookDispatcher]:
    """``run_forever`` in the background for the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run_forever(stop))
    try:
        yield dispatcher
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)


def webhook_settings(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "pg_dsn": dsn,
        "webhook_retry_schedule_seconds": [0.05, 0.1, 0.2, 0.4, 0.8],
        "webhook_timeout_seconds": 5.0,
        "webhook_max_in_flight_per_endpoint": 4,
        "webhook_dispatch_interval_seconds": 0.02,
    }
    values.update(overrides)
    return Settings(**values)


async def delivery_rows(pool: asyncpg.Pool, merchant_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE merchant_id = $1 ORDER BY id", merchant_id
    )
    return rows


async def attempt_rows(pool: asyncpg.Pool, merchant_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        """
        SELECT d.event_id, a.attempt, a.status_code, a.error, a.latency_ms
          FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id
         WHERE d.merchant_id = $1
         ORDER BY d.event_id, a.attempt
        """,
        merchant_id,
    )
    return rows


def all_in(status: str) -> Callable[[list[asyncpg.Record]], bool]:
    return lambda rows: bool(rows) and all(r["status"] == status for r in rows)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
async def dsn(pg_dsn: str) -> AsyncIterator[str]:
    async with isolated_database(pg_dsn) as created:
        yield created


@pytest.fixture(scope="module")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(dsn, min_size=1, max_size=8)
    try:
        yield created
    finally:
        await created.close()


EndpointFactory = Callable[..., Awaitable[tuple[int, str]]]


@pytest.fixture()
async def endpoint(pool: asyncpg.Pool) -> AsyncIterator[EndpointFactory]:
    """Adds endpoints; disables them after the test so later tests' dispatchers skip them."""
    made: list[int] = []

    async def add(merchant_id: str, url: str, event_types: list[str] | None = None) -> tuple[
        int, str
    ]:
        async with pool.acquire() as conn:
            created = await add_endpoint(conn, merchant_id, url, event_types)
        made.append(created.endpoint.id)
        return created.endpoint.id, created.secret

    yield add
    async with pool.acquire() as conn:
        for endpoint_id in made:
            await disable_endpoint(conn, endpoint_id)


async def enqueue(pool: asyncpg.Pool, events: list[PaymentEvent]) -> int:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue_deliveries(conn, events)


# ----------------------------------------------------------------------------- tests
async def test_signed_delivery_verifies_at_the_receiver(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    async with receiving(Receiver()) as receiver:
        _, secret = await endpoint(merchant, receiver.url)
        event = make_event(merchant)
        assert await enqueue(pool, [event]) == 1
        async with WebhookDispatcher(pool, webhook_settings(dsn)) as dispatcher:
            assert await dispatcher.run_once() == 1
    [call] = receiver.calls
    assert call.headers["Content-Type"] == "application/json"
    assert call.event_id == event.event_id
    assert call.attempt == 1
    assert call.body == event.model_dump_json().encode()  # the exact stored bytes
    decoded = verify_signature(call.body, call.signature, secret)
    assert decoded["event_id"] == event.event_id
    assert PaymentEvent.model_validate(decoded) == event
    # At the receiver: a tampered body, a wrong secret, a stale timestamp each fail.
    tampered = call.body.replace(b"1999", b"9999")
    with pytest.raises(SignatureError):
        verify_signature(tampered, call.signature, secret)
    with pytest.raises(SignatureError):
        verify_signature(call.body, call.signature, "whsec_wrong")
    signed_at = int(call.signature.split(",")[0].removeprefix("t="))
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(call.body, call.signature, secret, now=signed_at + 301)
    [row] = await delivery_rows(pool, merchant)
    assert row["status"] == "delivered"
    assert row["attempts"] == 1
    assert row["last_status_code"] == 200
    assert row["delivered_at"] is not None
    assert bytes(row["payload"]) == call.body


async def test_rotation_signs_with_both_secrets_until_the_overlap_ends(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    async with receiving(Receiver()) as receiver:
        endpoint_id, old_secret = await endpoint(merchant, receiver.url)
        async with pool.acquire() as conn:
            rotated = await rotate_secret(conn, endpoint_id, timedelta(hours=1))
        new_secret = rotated.secret
        assert new_secret != old_secret
        await enqueue(pool, [make_event(merchant)])
        async with WebhookDispatcher(pool, webhook_settings(dsn)) as dispatcher:
            assert await dispatcher.run_once() == 1
            [call] = receiver.calls
            assert call.signature.count("v1=") == 2
            verify_signature(call.body, call.signature, old_secret)  # not deployed yet
            verify_signature(call.body, call.signature, new_secret)  # already deployed
            verify_signature(call.body, call.signature, [new_secret, old_secret])

            # The overlap over (rotation with none): only the newest secret signs.
            async with pool.acquire() as conn:
                newest = (await rotate_secret(conn, endpoint_id, timedelta(0))).secret
            await enqueue(pool, [make_event(merchant)])
            assert await dispatcher.run_once() == 1
    latest = receiver.calls[-1]
    assert latest.signature.count("v1=") == 1
    verify_signature(latest.body, latest.signature, newest)
    with pytest.raises(SignatureError):
        verify_signature(latest.body, latest.signature, new_secret)


async def test_failing_receiver_recovers_and_every_event_is_delivered(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    failures = 7
    receiver = Receiver(answer=lambda n: 500 if n < failures else 200)
    events = [make_event(merchant) for _ in range(5)]
    async with receiving(receiver):
        _, secret = await endpoint(merchant, receiver.url)
        assert await enqueue(pool, events) == 5
        async with dispatching(WebhookDispatcher(pool, webhook_settings(dsn))):
            rows = await wait_until(
                lambda: _if(all_in("delivered"), delivery_rows(pool, merchant))
            )
    assert len(rows) == 5
    received = receiver.by_event()
    assert set(received) == {e.event_id for e in events}
    assert sum(1 for c in receiver.calls if c.answered == 500) == failures
    payloads = {e.event_id: e.model_dump_json().encode() for e in events}
    for event_id, calls in received.items():
        # Same id, same bytes on every attempt; attempts numbered 1, 2, ... in order.
        assert all(c.body == payloads[event_id] for c in calls)
        assert all(json.loads(c.body)["event_id"] == event_id for c in calls)
        assert sorted(c.attempt for c in calls) == list(range(1, len(calls) + 1))
        assert calls[-1].answered == 200
        for call in calls:
            verify_signature(call.body, call.signature, secret)
    # The attempt log has every attempt with what the receiver answered.
    answered = {(c.event_id, c.attempt): c.answered for c in receiver.calls}
    logged = {(r["event_id"], r["attempt"]): r["status_code"] for r in
              await attempt_rows(pool, merchant)}
    assert logged == answered
    for row in rows:
        assert row["attempts"] == len(received[row["event_id"]])
        assert row["last_status_code"] == 200
        assert row["delivered_at"] is not None


async def _if(
    predicate: Callable[[list[asyncpg.Record]], bool],
    rows: Awaitable[list[asyncpg.Record]],
) -> list[asyncpg.Record] | None:
    found = await rows
    return found if predicate(found) else None


async def test_exhausted_schedule_marks_dead_and_calls_on_dead(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    dead: list[DeadDelivery] = []

    async def on_dead(delivery: DeadDelivery) -> None:
        dead.append(delivery)

    settings = webhook_settings(dsn, webhook_retry_schedule_seconds=[0.01, 0.02])
    event = make_event(merchant)
    async with receiving(Receiver(answer=lambda _n: 503)) as receiver:
        endpoint_id, _ = await endpoint(merchant, receiver.url)
        await enqueue(pool, [event])
        async with WebhookDispatcher(pool, settings, on_dead) as dispatcher:

            async def dead_yet() -> list[asyncpg.Record] | None:
                await dispatcher.run_once()
                return await _if(all_in("dead"), delivery_rows(pool, merchant))

            [row] = await wait_until(dead_yet)
    assert row["attempts"] == 3  # the first attempt, then one per schedule step
    assert row["last_status_code"] == 503
    assert row["last_error"] == "HTTP 503"
    assert row["next_attempt_at"] is None
    assert [c.attempt for c in receiver.calls] == [1, 2, 3]
    assert [r["status_code"] for r in await attempt_rows(pool, merchant)] == [503, 503, 503]
    [delivery] = dead
    assert delivery.event_id == event.event_id
    assert delivery.endpoint_id == endpoint_id
    assert delivery.endpoint_url == receiver.url
    assert delivery.payment_id == event.payment_id
    assert delivery.payload == event.model_dump_json().encode()
    assert delivery.attempts == 3
    assert delivery.last_status_code == 503
    assert delivery.first_attempt_at is not None
    assert delivery.first_attempt_at <= delivery.dead_at


async def test_failing_on_dead_leaves_the_delivery_pending(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")

    async def broken(_delivery: DeadDelivery) -> None:
        raise RuntimeError("DLQ unreachable")

    settings = webhook_settings(dsn, webhook_retry_schedule_seconds=[])
    async with receiving(Receiver(answer=lambda _n: 500)) as receiver:
        await endpoint(merchant, receiver.url)
        await enqueue(pool, [make_event(merchant)])
        async with WebhookDispatcher(pool, settings, broken) as dispatcher:
            assert await dispatcher.run_once() == 1
    [row] = await delivery_rows(pool, merchant)
    assert row["status"] == "pending"  # not dead until the dead letter is written
    assert row["next_attempt_at"] > datetime.now(UTC)  # tried again after the lease
    assert [r["status_code"] for r in await attempt_rows(pool, merchant)] == [500]


async def test_unreachable_endpoint_is_an_attempt_with_an_error(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    await endpoint(merchant, f"http://127.0.0.1:{free_port()}/nobody-listens?token=s3cret")
    await enqueue(pool, [make_event(merchant)])
    async with WebhookDispatcher(pool, webhook_settings(dsn)) as dispatcher:
        assert await dispatcher.run_once() == 1
    [row] = await delivery_rows(pool, merchant)
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["last_status_code"] is None
    assert row["last_error"]
    assert "s3cret" not in row["last_error"]
    [attempt] = await attempt_rows(pool, merchant)
    assert attempt["status_code"] is None
    assert attempt["error"] == row["last_error"]


async def test_per_endpoint_concurrency_never_exceeds_the_limit(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    limit = 3
    gate = asyncio.Event()
    receiver = Receiver(gate=gate)
    settings = webhook_settings(dsn, webhook_max_in_flight_per_endpoint=limit)
    async with receiving(receiver):
        endpoint_id, _ = await endpoint(merchant, receiver.url)
        assert await enqueue(pool, [make_event(merchant) for _ in range(12)]) == 12
        dispatcher = WebhookDispatcher(pool, settings)
        async with dispatching(dispatcher):
            # The receiver holds every request: the dispatcher fills the endpoint's slots...
            await wait_until(lambda: _value(receiver.in_flight == limit))
            assert dispatcher.in_flight() == {endpoint_id: limit}
            # ...and a further poll claims nothing for it while they are all taken.
            assert await dispatcher.run_once() == 0
            assert receiver.in_flight == limit
            gate.set()
            await wait_until(lambda: _if(all_in("delivered"), delivery_rows(pool, merchant)))
    assert len(receiver.calls) == 12
    assert receiver.max_in_flight == limit


async def _value(value: Any) -> Any:
    return value


async def test_disabled_endpoint_is_not_sent_to(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    async with receiving(Receiver()) as receiver:
        endpoint_id, _ = await endpoint(merchant, receiver.url)
        await enqueue(pool, [make_event(merchant)])
        async with pool.acquire() as conn:
            await disable_endpoint(conn, endpoint_id)
        async with WebhookDispatcher(pool, webhook_settings(dsn)) as dispatcher:
            assert await dispatcher.run_once() == 0
    assert receiver.calls == []
    [row] = await delivery_rows(pool, merchant)
    assert (row["status"], row["attempts"]) == ("pending", 0)


async def test_two_dispatchers_never_send_the_same_attempt_twice(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    """Two workers: SKIP LOCKED plus the lease give each delivery to one of them."""
    merchant = unique("m")
    async with receiving(Receiver()) as receiver:
        await endpoint(merchant, receiver.url)
        await enqueue(pool, [make_event(merchant) for _ in range(20)])
        settings = webhook_settings(dsn, webhook_max_in_flight_per_endpoint=2)
        async with dispatching(WebhookDispatcher(pool, settings)), dispatching(
            WebhookDispatcher(pool, settings)
        ):
            await wait_until(lambda: _if(all_in("delivered"), delivery_rows(pool, merchant)))
    assert len(receiver.calls) == 20
    assert len({c.event_id for c in receiver.calls}) == 20
    assert {c.attempt for c in receiver.calls} == {1}


async def test_run_forever_survives_failing_iterations(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Iterations fail (no tables yet), are logged, and the loop goes on to deliver."""
    merchant = unique("m")
    async with isolated_database(pg_dsn, migrated=False) as bare, receiving(
        Receiver()
    ) as receiver:
        pool = await asyncpg.create_pool(bare, min_size=1, max_size=4)
        try:
            with caplog.at_level(logging.ERROR, logger="sinks.webhook_dispatcher"):
                async with dispatching(WebhookDispatcher(pool, webhook_settings(bare))):
                    await wait_until(
                        lambda: _value(
                            sum("iteration failed" in r.getMessage() for r in caplog.records)
                            >= 2
                        )
                    )
                    await migrate(pool)
                    async with pool.acquire() as conn:
                        await add_endpoint(conn, merchant, receiver.url)
                    await enqueue(pool, [make_event(merchant)])
                    await wait_until(
                        lambda: _if(all_in("delivered"), delivery_rows(pool, merchant))
                    )
        finally:
            await pool.close()
    assert len(receiver.calls) == 1


async def test_backlog_gauge_counts_pending_deliveries(
    pool: asyncpg.Pool, dsn: str, endpoint: EndpointFactory
) -> None:
    merchant = unique("m")
    endpoint_id, _ = await endpoint(merchant, f"http://127.0.0.1:{free_port()}/x")
    await enqueue(pool, [make_event(merchant) for _ in range(3)])
    async with pool.acquire() as conn:
        await disable_endpoint(conn, endpoint_id)
        expected = await conn.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
        )
    async with WebhookDispatcher(pool, webhook_settings(dsn)) as dispatcher:
        assert await dispatcher.update_backlog() == expected
    assert REGISTRY.get_sample_value("paystream_webhook_deliveries_pending") == expected
    assert expected >= 3


class RecordingPublisher:
    """Stands in for topics.publisher.EventPublisher (records; no broker here)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.flushed = 0

    def publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.records.append((topic, key, value, headers or []))

    async def flush(self, wait_seconds: float = 60.0) -> None:
        self.flushed = len(self.records)


async def test_kafka_dead_letter_publishes_payload_with_dlq_headers() -> None:
    publisher = RecordingPublisher()
    on_dead = kafka_dead_letter(publisher)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    event = make_event("m_dlq")
    dead = DeadDelivery(
        delivery_id=42,
        event_id=event.event_id,
        endpoint_id=7,
        endpoint_url="https://user:pw@merchant.example/hooks?token=abc",
        payment_id=event.payment_id,
        merchant_id="m_dlq",
        event_type=event.type,
        payload=event.model_dump_json().encode(),
        attempts=11,
        last_status_code=500,
        last_error="HTTP 500",
        created_at=now - timedelta(days=3),
        first_attempt_at=now - timedelta(days=3),
        dead_at=now,
    )
    await on_dead(dead)
    [(topic, key, value, headers)] = publisher.records
    assert publisher.flushed == 1  # flushed before returning
    assert topic == WEBHOOKS_DLQ
    assert key == event.payment_id.encode()
    assert value == dead.payload
    envelope = DlqEnvelope.from_headers(headers)
    assert envelope.stage == "webhook"
    assert envelope.reason == "retries_exhausted"
    assert envelope.original_topic == EVENTS
    assert envelope.attempts == 11
    assert "endpoint 7" in envelope.error_message
    assert "https://user:***@merchant.example/hooks?token=***" in envelope.error_message
    assert ":pw@" not in envelope.error_message and "abc" not in envelope.error_message
    assert dict(headers)["webhook.endpoint_id"] == b"7"


def test_helpers_are_consistent() -> None:
    # The dispatcher's header names are the ones the merchant helper documents.
    from paystream import webhooks
    from sinks import webhook_dispatcher

    assert webhook_dispatcher.SIGNATURE_HEADER == webhooks.SIGNATURE_HEADER
    assert webhook_dispatcher.EVENT_ID_HEADER == webhooks.EVENT_ID_HEADER
