"""Unknown PSP outcomes are settled only by the PSP's own statement (issue 11, 1/2/6/8).

* Finding 1: a lookup that fails (5xx, 429, refused) is never taken for an answer.
* Finding 2: a capture whose request is still in flight at the PSP is not "failed" because
  a read does not show it yet: the resolver re-sends the same request (same attempt id).
* Finding 6: a late webhook of an earlier attempt does not settle the pending one.
* Finding 7: a payment whose verification was given up is re-verified by the stuck sweep.
* Finding 8 (a retry after a recorded retryable decline is a fresh attempt) is pinned by
  ``tests/agents/test_pipeline.py::test_retryable_decline_retries_with_new_attempts...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from agents.executor import Executor
from agents.state import PaymentState, PendingAttempt
from config.settings import Settings
from paystream.client import PaymentsClient
from psp.protocol import PspNotification
from psp.routing import Router, default_routing_table
from schemas.dlq import DlqEnvelope
from tests.agents.kafka_reader import TopicReader
from tests.agents.test_lifecycle import set_faults
from tests.agents.test_pipeline import sandbox_charges, unique
from topics.catalog import EVENTS_DLQ

# -- pure logic ---------------------------------------------------------------------------


def _pending_state(attempt: str) -> PaymentState:
    state = PaymentState(payment_id="pay_f6", merchant_id="m_f6", status="pending_verification",
                         amount=1_000, currency="USD", psp="alpha", attempts=2)
    state.pending = PendingAttempt(
        operation="authorize", attempt_id=attempt, amount=1_000, command_id="cmd_1",
        idempotency_key="k1", command_created_at=datetime.now(UTC),
    )
    return state


def _note(attempt: str | None, event_type: str, status: str) -> PspNotification:
    return PspNotification.model_validate({
        "psp": "alpha", "event_id": f"evt_{event_type}_{attempt}", "type": event_type,
        "psp_reference": f"pi_{attempt}", "payment_id": "pay_f6", "attempt_id": attempt,
        "status": status, "amount": 1_000, "currency": "USD",
    })


def test_a_late_webhook_of_an_earlier_attempt_does_not_settle_the_pending_one() -> None:
    """Attempt 1 got a retryable decline, attempt 2 timed out (and charged): attempt 1's
    late ``payment_failed`` webhook must not decline the payment."""
    executor = Executor(Router([], default_routing_table()), 290, 30)
    state = _pending_state("att_pay_f6_authorize_2")
    stale = _note("att_pay_f6_authorize_1", "payment_intent.payment_failed",
                  "requires_payment_method")
    assert executor.apply_notification(state, stale) is None
    assert state.status == "pending_verification"
    anonymous = _note(None, "payment_intent.payment_failed", "requires_payment_method")
    assert executor.apply_notification(state, anonymous) is None
    own = _note("att_pay_f6_authorize_2", "payment_intent.succeeded", "succeeded")
    settled = executor.apply_notification(state, own)
    assert settled is not None and settled.type == "payment.captured"
    assert state.pending is None and state.amount_captured == 1_000


# -- through the pipeline -----------------------------------------------------------------


def set_webhooks(live: Settings, **knobs: float) -> None:
    for psp in live.psp_endpoints():
        request = urllib.request.Request(  # noqa: S310 - local sandbox
            f"{psp.url}/sandbox/webhooks/config", data=json.dumps(knobs).encode(),
            method="POST", headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            assert response.status == 200


@pytest.fixture()
def no_webhooks(live: Settings) -> Iterator[None]:
    """Hold the PSPs' webhooks back, so only lookups can settle a payment."""
    set_webhooks(live, delay_ms=600_000)
    try:
        yield
    finally:
        set_webhooks(live, delay_ms=0)


def _of(events: TopicReader, payment: str) -> list[dict[str, Any]]:
    return [v for v in events.values() if v["payment_id"] == payment]


@pytest.mark.stack
def test_a_failed_lookup_never_declines_a_charged_payment(
    live: Settings, client: PaymentsClient, events: TopicReader, no_webhooks: None
) -> None:
    """The authorize times out (the PSP charged); every lookup then gets a 5xx. The
    payment must stay pending (never declined), and settle as captured once the PSP
    answers again."""
    payment, merchant = unique("pay"), unique("m")
    set_faults(live, timeout_rate=1.0)
    try:
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                         amount=1_010, currency="USD", payment_method="tok_visa")
        client.flush()
        events.until(lambda _r: _of(events, payment), timeout=30)
        set_faults(live, timeout_rate=0.0, error_rate=1.0)
        pending = _of(events, payment)
        assert [e["type"] for e in pending] == ["payment.pending_verification"], pending
        # Several lookups answered 5xx: still pending, nothing else emitted.
        with pytest.raises(AssertionError):
            events.until(lambda _r: len(_of(events, payment)) > 1, timeout=4)
    finally:
        set_faults(live, timeout_rate=0.0, error_rate=0.0)
    events.until(lambda _r: len(_of(events, payment)) > 1, timeout=60)
    types = [v["type"] for v in _of(events, payment)]
    assert types == ["payment.pending_verification", "payment.captured"], types
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert [c["amount_captured"] for c in charges] == [1_010]


@pytest.mark.stack
def test_a_capture_still_in_flight_is_not_failed_by_a_read(
    live: Settings, client: PaymentsClient, events: TopicReader, no_webhooks: None
) -> None:
    """The capture takes longer than our timeout. A read would still see the payment
    uncaptured; the resolver re-sends the capture instead and gets the real outcome."""
    payment, merchant = unique("pay"), unique("m")
    client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                     amount=1_020, currency="USD", payment_method="tok_visa",
                     capture_method="manual")
    client.flush()
    events.until(lambda _r: _of(events, payment), timeout=30)
    assert _of(events, payment)[0]["type"] == "payment.authorized"
    set_faults(live, latency_ms=live.psp_timeout_seconds * 3_000)
    try:
        client.capture(merchant_id=merchant, payment_id=payment, idempotency_key="c")
        client.flush()
        events.until(lambda _r: len(_of(events, payment)) > 1, timeout=30)
    finally:
        set_faults(live, latency_ms=0.0)
    assert _of(events, payment)[1]["type"] == "payment.pending_verification"
    events.until(lambda _r: len(_of(events, payment)) > 2, timeout=60)
    types = [v["type"] for v in _of(events, payment)]
    assert types == ["payment.authorized", "payment.pending_verification",
                     "payment.captured"], types
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert [c["amount_captured"] for c in charges] == [1_020]


@pytest.mark.stack
def test_a_payment_whose_verification_was_given_up_is_swept_and_settled(
    live: Settings, client: PaymentsClient, events: TopicReader, no_webhooks: None
) -> None:
    """The PSP keeps failing every lookup until the resolver stops asking (a dead letter
    for an operator). The payment stays pending, is listed as stuck, and the stuck sweep
    settles it once the PSP answers again."""
    payment, merchant = unique("pay"), unique("m")
    dlq = TopicReader(live.kafka_bootstrap_servers, EVENTS_DLQ)
    set_faults(live, timeout_rate=1.0)
    try:
        client.authorize(merchant_id=merchant, payment_id=payment, idempotency_key="a",
                         amount=1_070, currency="USD", payment_method="tok_visa")
        client.flush()
        events.until(lambda _r: _of(events, payment), timeout=30)
        set_faults(live, timeout_rate=0.0, error_rate=1.0)

        def given_up(_records: object) -> bool:
            return any(
                r.key() == payment.encode()
                and DlqEnvelope.from_headers(r.headers()).reason == "unresolved"
                for r in dlq.records
            )

        dlq.until(given_up, timeout=90)
        assert [e["type"] for e in _of(events, payment)] == ["payment.pending_verification"]
        listed = subprocess.run(  # noqa: S603 - our own CLI
            [sys.executable, "-m", "ops.cli", "status", "--stuck", "--older-than", "1",
             "--json"],
            env={**os.environ, **cli_env(live)}, capture_output=True, text=True, timeout=60,
            check=False,
        )
        assert listed.returncode == 1, listed.stderr
        assert payment in {p["payment_id"] for p in json.loads(listed.stdout)["payments"]}
    finally:
        set_faults(live, timeout_rate=0.0, error_rate=0.0)
        dlq.close()
    events.until(lambda _r: len(_of(events, payment)) > 1, timeout=60)
    types = [v["type"] for v in _of(events, payment)]
    assert types == ["payment.pending_verification", "payment.captured"], types
    charges = [c for c in sandbox_charges(live) if c.get("payment_id") == payment]
    assert [c["amount_captured"] for c in charges] == [1_070]


def cli_env(live: Settings) -> dict[str, str]:
    return {
        "PAYSTREAM_KAFKA_BOOTSTRAP_SERVERS": live.kafka_bootstrap_servers,
        "PAYSTREAM_PG_DSN": live.pg_dsn,
        "PAYSTREAM_REDIS_URL": live.redis_url,
        "PAYSTREAM_STUCK_AFTER_SECONDS": "5",
    }
