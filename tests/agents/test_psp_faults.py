"""PSP faults under load: timeouts and lost responses never lead to a second charge."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from paystream.client import PaymentsClient
from tests.conftest import async_wait_for

pytestmark = pytest.mark.stack

CHARGED = {"succeeded", "requires_capture"}
SETTLED = {"captured", "declined", "failed", "pending_verification", "requires_action"}


def post_json(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(  # noqa: S310 - local sandbox
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        assert response.status == 200


def ground_truth(live: Settings) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for psp in live.psp_endpoints():
        with urllib.request.urlopen(f"{psp.url}/sandbox/charges", timeout=10) as r:  # noqa: S310
            body = json.loads(r.read())
        out.extend(body["charges"] if isinstance(body, dict) else body)
    return out


@pytest.fixture()
def faulty_alpha(live: Settings) -> Iterator[None]:
    faults = f"{live.psp_alpha_url}/sandbox/faults"
    post_json(faults, {"timeout_rate": 0.2, "lost_response_rate": 0.1})
    try:
        yield
    finally:
        post_json(faults, {"timeout_rate": 0.0, "lost_response_rate": 0.0})


async def test_timeouts_and_lost_responses_charge_each_payment_at_most_once(
    live: Settings, faulty_alpha: None
) -> None:
    run = uuid.uuid4().hex[:8]
    payments = [f"pay_fault_{run}_{n:04d}" for n in range(1_000)]
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        for n, payment in enumerate(payments):
            # Below USD 25.00 alpha is the cheaper PSP, so alpha takes the faults.
            client.authorize(merchant_id=f"m_fault_{n % 5}", payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=1_000 + n, currency="USD",
                             payment_method="tok_visa")

    conn = await asyncpg.connect(live.pg_dsn)
    try:
        async def statuses() -> dict[str, str] | None:
            rows = await conn.fetch(
                "SELECT payment_id, status FROM payment_status WHERE payment_id LIKE $1",
                f"pay_fault_{run}_%",
            )
            found = {row["payment_id"]: row["status"] for row in rows}
            settled = len(found) == len(payments) and "pending_verification" not in set(
                found.values()
            )
            return found if settled else None

        # Unknown outcomes are looked up at the PSP by attempt id and resolved.
        final = await async_wait_for(statuses, within=240)
        went_pending = await conn.fetchval(
            "SELECT count(DISTINCT payment_id) FROM payment_events "
            "WHERE payment_id LIKE $1 AND type = 'payment.pending_verification'",
            f"pay_fault_{run}_%",
        )
    finally:
        await conn.close()

    assert went_pending > 0  # the faults did happen
    # The sandbox charged every timed-out or lost request; resolution found each charge.
    assert Counter(final.values()) == {"captured": len(payments)}

    charges = [c for c in ground_truth(live) if c.get("payment_id") in final]
    charged = Counter(c["payment_id"] for c in charges if c["status"] in CHARGED)
    assert max(charged.values()) == 1, "a payment was charged twice"
    for payment, status in final.items():
        if status == "captured":
            assert charged[payment] == 1
        if status in {"declined", "failed"}:
            assert charged[payment] == 0
