"""Merchant webhooks through the whole pipeline: payment -> ledger sink -> outbox -> HTTP.

A real local receiver that fails its first requests with 500 and then recovers; every
event must arrive, signed (verified with the helper merchants import), with one stable
event id across attempts, and the delivery log must show every attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from config.settings import Settings
from ops.stack import free_port
from paystream.client import PaymentsClient
from paystream.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from sinks.webhook_endpoints import add_endpoint
from tests.agents.test_pipeline import unique
from tests.conftest import async_wait_for

pytestmark = pytest.mark.stack


class Receiver:
    """Answers 500 to its first ``failures`` requests, then 200; records everything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.requests: list[tuple[int, bytes, dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        answer = 500 if len(self.requests) < self.failures else 200
        self.requests.append((answer, body, dict(request.headers)))
        return web.Response(status=answer)


@pytest.fixture()
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    target = Receiver(failures=3)
    app = web.Application()
    app.router.add_post("/hooks", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield target, f"http://127.0.0.1:{port}/hooks"
    await runner.cleanup()


async def test_every_event_reaches_a_recovering_receiver_signed_with_a_stable_id(
    live: Settings, receiver: tuple[Receiver, str]
) -> None:
    target, url = receiver
    merchant = unique("m_hooks")
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        created = await add_endpoint(conn, merchant, url)
        payments = [unique("pay") for _ in range(3)]
        with PaymentsClient(live.kafka_bootstrap_servers) as client:
            for payment in payments:
                client.authorize(merchant_id=merchant, payment_id=payment,
                                 idempotency_key=f"{payment}-a", amount=2_000, currency="USD",
                                 payment_method="tok_visa", capture_method="manual")
                client.capture(merchant_id=merchant, payment_id=payment,
                               idempotency_key=f"{payment}-c")
            client.flush()

        def delivered_ids() -> set[str]:
            return {h[EVENT_ID_HEADER] for code, _b, h in target.requests if code == 200}

        async def all_delivered() -> bool:
            return len(delivered_ids()) == 2 * len(payments)

        await async_wait_for(all_delivered, within=60)
        events: dict[str, dict[str, Any]] = {}
        for _code, body, headers in target.requests:
            event = verify_signature(body, headers[SIGNATURE_HEADER], created.secret)
            assert event["event_id"] == headers[EVENT_ID_HEADER]  # stable id, every attempt
            events[event["event_id"]] = event
        assert {e["type"] for e in events.values()} == {"payment.authorized", "payment.captured"}
        assert {e["payment_id"] for e in events.values()} == set(payments)
        assert any(code == 500 for code, _b, _h in target.requests)

        async def log_complete() -> list[asyncpg.Record]:
            rows = await conn.fetch(
                "SELECT a.status_code FROM webhook_attempts a "
                "JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.merchant_id = $1",
                merchant,
            )
            return rows if len(rows) == len(target.requests) else []

        rows = await async_wait_for(log_complete, within=10)
        assert sorted(r["status_code"] for r in rows) == sorted(
            code for code, _b, _h in target.requests
        )
        statuses = await conn.fetch(
            "SELECT status FROM webhook_deliveries WHERE merchant_id = $1", merchant
        )
        assert {r["status"] for r in statuses} == {"delivered"}
    finally:
        await conn.close()
