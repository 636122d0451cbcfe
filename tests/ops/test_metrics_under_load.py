"""The worker's ``/metrics`` under a real load, and consumer lag around a paused worker.

Real stack (``live``): commands through Tansu, the sandbox PSPs over HTTP (faults switched
on briefly, always switched off again), the ledger and webhook outbox in PostgreSQL, a
local merchant webhook receiver. The worker's registry lives for the whole test session,
so counters are compared with a scrape taken before the load: every expectation is about
what this load added. The gauges (lag, breakers, ledger imbalance, pending verification)
are refreshed by the worker's ``export_gauges`` timer every ``lag_poll_interval_seconds``,
so the scrape is repeated until they show up.

The lag test stops the worker's process (SIGSTOP) and always resumes it (SIGCONT). Commands
are produced one per record batch (flush after each) because Tansu's end offset is the base
offset of the last batch + 1: with one-record batches the backlog reads exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from agents.monitors import LagMonitor
from config.settings import Settings
from observability import metrics
from ops.stack import EmbeddedStack, free_port
from paystream.client import PaymentsClient
from sinks.webhook_endpoints import add_endpoint
from tests.agents.test_lifecycle import set_faults
from tests.agents.test_pipeline import unique
from tests.conftest import async_wait_for, wait_for
from topics import offsets
from topics.catalog import COMMANDS

pytestmark = pytest.mark.stack

Labels = frozenset[tuple[str, str]]


# --------------------------------------------------------------------------- scraping
@dataclass(frozen=True)
class Scrape:
    """One parsed ``/metrics`` answer: sample name -> label set -> value."""

    samples: dict[str, dict[Labels, float]] = field(default_factory=dict)

    def series(self, name: str, **labels: str) -> dict[Labels, float]:
        """The samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return {k: v for k, v in self.samples.get(name, {}).items() if wanted <= k}

    def total(self, name: str, **labels: str) -> float:
        return sum(self.series(name, **labels).values())


def parse(text: str) -> Scrape:
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            by_labels = scrape.samples.setdefault(sample.name, {})
            by_labels[frozenset(sample.labels.items())] = sample.value
    return scrape


def scrape_worker(live: Settings) -> Scrape:
    url = f"http://{live.web_host}:{live.web_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local worker
        return parse(response.read().decode())


async def scrape(live: Settings) -> Scrape:
    # In a thread: the merchant webhook receiver answers on this test's event loop.
    return await asyncio.to_thread(scrape_worker, live)


async def until_met(
    check: Callable[[], Awaitable[list[str]]], within: float, what: str
) -> None:
    """Repeat ``check`` (it returns what is still missing) until nothing is missing."""
    deadline = time.monotonic() + within
    missing = await check()
    while missing:
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: still missing after {within:.0f}s:\n  " + "\n  ".join(missing))
        await asyncio.sleep(0.2)
        missing = await check()


def commands_lag(scrape: Scrape, group: str) -> dict[int, float]:
    """``paystream_consumer_lag`` of ``group`` on payments.commands, by partition."""
    return {
        int(dict(labels)["partition"]): value
        for labels, value in scrape.series(
            "paystream_consumer_lag", group=group, topic=COMMANDS
        ).items()
    }


# --------------------------------------------------------------------------- helpers
async def statuses(live: Settings, payment_ids: list[str]) -> dict[str, str]:
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT payment_id, status FROM payment_status WHERE payment_id = ANY($1::text[])",
            payment_ids,
        )
    finally:
        await conn.close()
    return {row["payment_id"]: row["status"] for row in rows}


async def wait_for_statuses(live: Settings, expected: dict[str, str], within: float) -> None:
    async def missing() -> list[str]:
        found = await statuses(live, list(expected))
        return [f"{p}: {found.get(p)} (want {want})"
                for p, want in expected.items() if found.get(p) != want]

    await until_met(missing, within, "payment statuses")


async def faults(live: Settings, **knobs: float) -> None:
    await asyncio.to_thread(set_faults, live, **knobs)


class Receiver:
    """A merchant's webhook endpoint: 500 to its first ``failures`` requests, then 200."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.answers: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        answer = 500 if len(self.answers) < self.failures else 200
        self.answers.append(answer)
        return web.Response(status=answer)


@pytest.fixture()
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    target = Receiver(failures=2)
    app = web.Application()
    app.router.add_post("/hooks", target.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield target, f"http://127.0.0.1:{port}/hooks"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- the load
async def test_metrics_cover_the_load(
    live: Settings, receiver: tuple[Receiver, str]
) -> None:
    target, url = receiver
    merchant = unique("m_metrics")
    conn = await asyncpg.connect(live.pg_dsn)
    try:
        await add_endpoint(conn, merchant, url)
    finally:
        await conn.close()
    before = await scrape(live)

    # ---- a mixed load without faults: every outcome below is deterministic
    expected: dict[str, str] = {}
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        automatic = [unique("pay_auto") for _ in range(18)]
        for n, payment in enumerate(automatic):
            # Below USD 25.00 alpha is the cheaper PSP, above it beta: both PSPs are used.
            amount, currency = [(1_000 + n, "USD"), (40_000 + n, "USD"), (2_000 + n, "EUR")][n % 3]
            client.authorize(merchant_id=merchant, payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=amount, currency=currency,
                             payment_method="tok_visa")
            expected[payment] = "captured"
        for payment in automatic[:3]:  # same key as the authorization: processed after it
            client.refund(merchant_id=merchant, payment_id=payment,
                          idempotency_key=f"{payment}-r", refund_id=f"re_{payment}")
            expected[payment] = "refunded"
        for n in range(6):
            payment = unique("pay_manual")
            client.authorize(merchant_id=merchant, payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=3_000 + n, currency="USD",
                             payment_method="tok_mastercard", capture_method="manual")
            client.capture(merchant_id=merchant, payment_id=payment,
                           idempotency_key=f"{payment}-c")
            expected[payment] = "captured"
        for n in range(3):
            payment = unique("pay_declined")
            client.authorize(merchant_id=merchant, payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=700 + n, currency="USD",
                             payment_method="tok_chargeDeclinedInsufficientFunds")
            expected[payment] = "declined"
        client.send_raw(unique("pay_garbage").encode(), b"{not json")  # intake -> DLQ
        await asyncio.to_thread(client.flush)
    await wait_for_statuses(live, expected, within=60)

    # ---- PSP faults, one kind at a time (a 500 wins over a lost response in the sandbox)
    retried, lost, probe = unique("pay_retried"), unique("pay_lost"), unique("pay_probe")
    try:
        with PaymentsClient(live.kafka_bootstrap_servers) as client:
            # Every call is refused with a 429 (nothing processed): the inline retries are
            # refused too, so the command goes to a retry tier. (A 500 may have been
            # processed: that is an unknown outcome, verified, not retried.)
            await faults(live, rate_limit_rate=1.0)
            client.authorize(merchant_id=merchant, payment_id=retried,
                             idempotency_key=f"{retried}-a", amount=1_100, currency="USD",
                             payment_method="tok_visa")
            await asyncio.to_thread(client.flush)

            async def not_retried() -> list[str]:
                now = await scrape(live)
                grew = now.total("paystream_retries_total", kind="command") > before.total(
                    "paystream_retries_total", kind="command")
                return [] if grew else ["paystream_retries_total{kind=command} increase"]

            await until_met(not_retried, 30, "retry under rate_limit_rate=1")

            # The PSP processes the call but the answer is lost: unknown outcome, the
            # payment waits in pending_verification and is looked up at the PSP.
            await faults(live, rate_limit_rate=0.0, lost_response_rate=1.0)
            client.authorize(merchant_id=merchant, payment_id=lost,
                             idempotency_key=f"{lost}-a", amount=1_200, currency="USD",
                             payment_method="tok_visa")
            await asyncio.to_thread(client.flush)

            async def not_pending() -> list[str]:
                key = {"type": "authorize_payment", "outcome": "payment.pending_verification"}
                now = await scrape(live)
                grew = now.total("paystream_commands_total", **key) > before.total(
                    "paystream_commands_total", **key)
                return [] if grew else [f"paystream_commands_total{key} increase"]

            await until_met(not_pending, 30, "pending verification under lost_response_rate=1")
    finally:
        await faults(live, rate_limit_rate=0.0, lost_response_rate=0.0)

    # ---- the stack is healthy again: a fresh payment goes through; the faulted ones settle
    with PaymentsClient(live.kafka_bootstrap_servers) as client:
        client.authorize(merchant_id=merchant, payment_id=probe, idempotency_key=f"{probe}-a",
                         amount=100, currency="USD", payment_method="tok_visa")
        await asyncio.to_thread(client.flush)
    await wait_for_statuses(
        live, {probe: "captured", retried: "captured", lost: "captured"}, within=90
    )

    # ---- every metric shows what the load did
    commands = [
        ("authorize_payment", "payment.captured"),
        ("authorize_payment", "payment.authorized"),
        ("capture_payment", "payment.captured"),
        ("authorize_payment", "payment.declined"),
        ("refund_payment", "payment.refunded"),
        ("unknown", "dlq"),
        ("authorize_payment", "payment.pending_verification"),
    ]
    # Each entry: a sample name and label sets whose samples, summed, must have grown.
    counters: list[tuple[str, list[dict[str, str]]]] = [
        *(("paystream_commands_total", [{"type": t, "outcome": o}]) for t, o in commands),
        # The pending payment is resolved by whichever comes first: the PSP's webhook
        # (psp_notification) or the lookup's answer (resolve_payment).
        ("paystream_commands_total", [{"type": t, "outcome": "payment.captured"}
                                      for t in ("psp_notification", "resolve_payment")]),
        ("paystream_end_to_end_latency_seconds_count", [{}]),
        # Lookups of unknown outcomes re-send the request under the same attempt id
        # (counted under its own operation, and in paystream_psp_verify_lookups_total);
        # "retrieve" is only for a request that cannot be re-sent.
        *(("paystream_psp_request_duration_seconds_count", [{"operation": op}])
          for op in ("authorize", "capture", "refund")),
        ("paystream_retries_total", [{"kind": "command"}]),
        ("paystream_dlq_records_total", [{"stage": "intake", "reason": "invalid_json"}]),
        ("paystream_webhook_deliveries_total", [{"result": "delivered"}]),
        ("paystream_webhook_deliveries_total", [{"result": "failed"}]),
        ("paystream_psp_webhooks_total", [{"result": "accepted"}]),
        ("paystream_psp_verify_lookups_total", [{}]),
    ]
    psps = [psp.name for psp in live.psp_endpoints()]

    def summed(taken: Scrape, name: str, label_sets: list[dict[str, str]]) -> float:
        return sum(taken.total(name, **labels) for labels in label_sets)

    async def unmet() -> list[str]:
        now = await scrape(live)
        missing = [
            f"{name}{label_sets} did not increase ({summed(before, name, label_sets)} -> "
            f"{summed(now, name, label_sets)})"
            for name, label_sets in counters
            if summed(now, name, label_sets) <= summed(before, name, label_sets)
        ]
        if not commands_lag(now, live.app_id):
            missing.append(f"paystream_consumer_lag: no sample for {live.app_id} on {COMMANDS}")
        for psp in psps:
            if not now.series("paystream_psp_breaker_state", psp=psp):
                missing.append(f"paystream_psp_breaker_state: no sample for psp {psp}")
        imbalance = now.series("paystream_ledger_imbalance_minor_units")
        for currency in ("USD", "EUR"):
            if not now.series("paystream_ledger_imbalance_minor_units", currency=currency):
                missing.append(f"paystream_ledger_imbalance_minor_units: no {currency} sample")
        if not now.series("paystream_payments_pending_verification"):
            missing.append("paystream_payments_pending_verification: no sample")
        if missing:
            return missing
        # Everything is there: the values that must hold (asserted, not waited for).
        assert all(value == 0 for value in imbalance.values()), imbalance
        assert all(value >= 0 for value in commands_lag(now, live.app_id).values())
        for psp in psps:
            assert set(now.series("paystream_psp_breaker_state", psp=psp).values()) <= {0, 1, 2}
        return []

    await until_met(unmet, 60, "metrics of the load")
    assert 500 in target.answers and 200 in target.answers


# --------------------------------------------------------------------------- consumer lag
def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def worker_stopped(stack: EmbeddedStack) -> Iterator[None]:
    """SIGSTOP the worker's process for the block; SIGCONT it whatever happens."""
    worker = stack.worker
    assert worker is not None and worker.poll() is None, "the worker is not running"
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(worker.pid) == "T", timeout=10)
        yield
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def own_lag(live: Settings) -> dict[int, float]:
    """What this process's ``LagMonitor`` last set for the worker's group on commands."""
    out: dict[int, float] = {}
    for family in metrics.CONSUMER_LAG.collect():
        for sample in family.samples:
            labels = sample.labels
            if labels["group"] == live.app_id and labels["topic"] == COMMANDS:
                out[int(labels["partition"])] = sample.value
    return out


def publish_one_per_batch(live: Settings, payment_ids: list[str], merchant: str) -> None:
    with PaymentsClient(live.kafka_bootstrap_servers, COMMANDS, **{"linger.ms": 0}) as client:
        for payment in payment_ids:
            client.authorize(merchant_id=merchant, payment_id=payment,
                             idempotency_key=f"{payment}-a", amount=500, currency="USD",
                             payment_method="tok_visa")
            client.flush()  # one record per batch: Tansu's end offset is then exact


async def test_lag_rises_while_the_worker_is_paused_and_drains_to_zero(
    live: Settings, stack: EmbeddedStack
) -> None:
    partitions = await asyncio.to_thread(offsets.topic_partitions, live, COMMANDS)
    monitor = LagMonitor(live)

    async def measured() -> dict[int, float]:
        try:
            await monitor.poll_once()
        except offsets.OffsetsError:
            return {}
        return own_lag(live)

    # Before: the worker has committed on every partition and is caught up. (Records on
    # every partition, so every partition has a committed offset and hence a sample.)
    warm_up = [unique("pay_warm") for _ in range(40)]
    await asyncio.to_thread(publish_one_per_batch, live, warm_up, unique("m_lag"))

    async def caught_up() -> dict[int, float] | None:
        lag = await measured()
        return lag if len(lag) == partitions and not any(lag.values()) else None

    await async_wait_for(caught_up, within=60)

    # Paused: the backlog builds up in the group's lag.
    backlog = [unique("pay_lag") for _ in range(200)]
    with worker_stopped(stack):
        stopped_at = time.monotonic()
        await asyncio.to_thread(publish_one_per_batch, live, backlog, unique("m_lag"))

        async def behind() -> dict[int, float] | None:
            lag = await measured()
            return lag if sum(lag.values()) >= len(backlog) else None

        lag = await async_wait_for(behind, within=30)
        assert len(lag) == partitions and all(value > 0 for value in lag.values()), lag
        # Stay stopped for one gauge interval, so the worker's gauge timer is due the
        # moment it resumes: its first export then measures the backlog, and the 0 it
        # reports later is a fresh measurement, not the value from before the pause.
        rest = live.lag_poll_interval_seconds - (time.monotonic() - stopped_at)
        if rest > 0:
            await asyncio.sleep(rest)

    # Resumed: the worker reports the backlog, drains it, and reports 0 everywhere.
    async def worker_reports_backlog() -> dict[int, float] | None:
        lag = commands_lag(await scrape(live), live.app_id)
        return lag if sum(lag.values()) > 0 else None

    await async_wait_for(worker_reports_backlog, within=30)

    async def worker_drained() -> list[str]:
        lag = commands_lag(await scrape(live), live.app_id)
        if len(lag) != partitions or any(lag.values()):
            return [f"paystream_consumer_lag on {COMMANDS}: {dict(sorted(lag.items()))}"]
        return []

    await until_met(worker_drained, 90, "lag back to 0")
    await wait_for_statuses(live, dict.fromkeys(backlog, "captured"), within=30)
    assert stack.worker is not None and stack.worker.poll() is None
