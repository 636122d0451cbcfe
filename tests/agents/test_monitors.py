"""The worker's periodic gauges and PSP latency, against real services.

* ``LagMonitor``: the embedded Tansu broker of the test stack (``live``), a topic and group
  of its own. Records are produced one per batch (flush after each) because Tansu's high
  watermark is the base offset of the last batch + 1.
* ``LedgerImbalanceMonitor``: a throwaway PostgreSQL database of its own (migrated, posted
  to with ``sinks.ledger``), so a deliberately broken ledger cannot disturb other tests.
* ``BreakerStateMonitor``: Redis (``PAYSTREAM_TEST_REDIS_URL``), keys under a unique prefix.
* PSP latency: a real sandbox PSP over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client import REGISTRY

from agents.monitors import BreakerStateMonitor, LagMonitor, LedgerImbalanceMonitor
from config.settings import Settings
from psp.breaker import RedisCircuitBreaker
from psp.protocol import AuthorizeRequest
from psp.sandbox import create_app
from psp.sandbox_adapter import SandboxAdapter
from sinks.ledger import CapturePosting, post_captures
from sinks.migrations import migrate
from tests.conftest import ADMIN_DSN, REDIS_URL, async_wait_for


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


# ------------------------------------------------------------------------ consumer lag
def _produce_one_per_batch(bootstrap: str, topic: str, counts: dict[int, int]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for partition, count in counts.items():
        for _ in range(count):
            producer.produce(topic, value=b"x", partition=partition)
            assert producer.flush(10) == 0  # one record per batch: Tansu's end is exact


def _commit(bootstrap: str, group: str, topic: str, positions: dict[int, int]) -> None:
    """Commit offsets as a member-less client (assign, no subscribe), then leave."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, p) for p in positions])
        consumer.commit(
            offsets=[TopicPartition(topic, p, o) for p, o in positions.items()],
            asynchronous=False,
        )
    finally:
        consumer.close()


@pytest.fixture()
def lag_topic(live: Settings) -> str:
    """A fresh 2-partition topic with 3 records in partition 0 and 4 in partition 1."""
    bootstrap = live.kafka_bootstrap_servers
    topic = f"lag-monitor-test-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(15)
    _produce_one_per_batch(bootstrap, topic, {0: 3, 1: 4})
    return topic


def _lag(group: str, topic: str, partition: int) -> float | None:
    return _sample("paystream_consumer_lag", group=group, topic=topic, partition=str(partition))


@pytest.mark.stack
async def test_lag_monitor_reports_end_minus_committed_then_zero(
    live: Settings, lag_topic: str
) -> None:
    group = f"lag-monitor-group-{uuid.uuid4().hex[:8]}"
    bootstrap = live.kafka_bootstrap_servers
    _commit(bootstrap, group, lag_topic, {0: 1, 1: 4})
    # The worker's own group is settings.app_id: point it at the test group.
    monitor = LagMonitor(live.model_copy(update={"app_id": group}))
    assert monitor.groups == (group,)

    await monitor.poll_once()
    assert _lag(group, lag_topic, 0) == 2
    assert _lag(group, lag_topic, 1) == 0

    _commit(bootstrap, group, lag_topic, {0: 3})
    await monitor.poll_once()
    assert (_lag(group, lag_topic, 0), _lag(group, lag_topic, 1)) == (0, 0)


@pytest.mark.stack
async def test_lag_monitor_covers_extra_groups_and_skips_uncommitted_partitions(
    live: Settings, lag_topic: str
) -> None:
    group = f"lag-monitor-extra-{uuid.uuid4().hex[:8]}"
    _commit(live.kafka_bootstrap_servers, group, lag_topic, {1: 1})  # partition 0: none
    monitor = LagMonitor(live, [group])
    assert monitor.groups == (live.app_id, group)

    await monitor.poll_once()
    assert _lag(group, lag_topic, 1) == 3
    assert _lag(group, lag_topic, 0) is None  # no committed offset: no sample


# ----------------------------------------------------------------------- ledger imbalance
@pytest.fixture()
async def ledger_pool() -> AsyncIterator[asyncpg.Pool]:
    """A pool on a fresh, unmigrated database (dropped afterwards)."""
    try:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"no PostgreSQL server at {ADMIN_DSN}: {exc}")
    name = f"paystream_monitor_{uuid.uuid4().hex[:10]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = urlunsplit(urlsplit(ADMIN_DSN)._replace(path=f"/{name}"))
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def _capture(event_id: str, currency: str, amount: int, fee: int) -> CapturePosting:
    return CapturePosting(
        event_id=event_id,
        payment_id=f"pay_{event_id}",
        merchant_id="m_monitor",
        amount=amount,
        fee=fee,
        currency=currency,
        occurred_at=datetime.now(UTC),
    )


def _imbalance(currency: str) -> float | None:
    return _sample("paystream_ledger_imbalance_minor_units", currency=currency)


async def test_ledger_imbalance_is_zero_per_currency_when_balanced(
    ledger_pool: asyncpg.Pool,
) -> None:
    await migrate(ledger_pool)
    async with ledger_pool.acquire() as conn:
        posted = await post_captures(
            conn,
            [
                _capture("evt_usd_1", "USD", 10_000, 320),
                _capture("evt_usd_2", "USD", 2_599, 105),
                _capture("evt_kwd_1", "KWD", 1_234, 0),
            ],
        )
    assert posted == 3
    monitor = LedgerImbalanceMonitor(ledger_pool)
    await monitor.poll_once()
    assert (_imbalance("USD"), _imbalance("KWD")) == (0, 0)


async def test_ledger_imbalance_shows_entries_that_do_not_sum_to_zero(
    ledger_pool: asyncpg.Pool,
) -> None:
    await migrate(ledger_pool)
    async with ledger_pool.acquire() as conn:
        await post_captures(conn, [_capture("evt_jpy_1", "JPY", 5_000, 150)])
        # Write around the application (as a superuser restoring a bad backup would):
        # replica mode skips the triggers that refuse an unbalanced transaction.
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                """
                INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)
                SELECT transaction_id, account_id, 7, currency
                  FROM ledger_entries WHERE currency = 'JPY' LIMIT 1
                """
            )
    monitor = LedgerImbalanceMonitor(ledger_pool)
    await monitor.poll_once()
    assert _imbalance("JPY") == 7


async def test_run_forever_survives_failed_polls_and_stops(
    ledger_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = LedgerImbalanceMonitor(ledger_pool)
    with pytest.raises(asyncpg.UndefinedTableError):
        await monitor.poll_once()  # not migrated yet: no ledger tables

    async def failure_logged() -> bool:
        return bool(caplog.records)

    async def eur_measured() -> bool:
        return _imbalance("EUR") == 0

    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="paystream.monitors"):
        task = asyncio.create_task(monitor.run_forever(0.05, stop))
        await async_wait_for(failure_logged)
        assert "ledger imbalance: poll failed" in caplog.records[0].getMessage()
        assert not task.done()

        await migrate(ledger_pool)  # the loop recovers on its own
        async with ledger_pool.acquire() as conn:
            await post_captures(conn, [_capture("evt_eur_1", "EUR", 900, 56)])
        await async_wait_for(eur_measured)

        stop.set()
        await asyncio.wait_for(task, timeout=5)


# ------------------------------------------------------------------------ breaker state
@pytest.fixture()
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        await client.aclose()
        pytest.skip(f"no Redis at {REDIS_URL}: {exc}")
    try:
        yield client
    finally:
        await client.aclose()


def _breaker_state(psp: str) -> float | None:
    return _sample("paystream_psp_breaker_state", psp=psp)


async def test_breaker_state_monitor_reflects_the_shared_breakers(
    redis_client: aioredis.Redis,
) -> None:
    prefix = f"monitor-test-{uuid.uuid4().hex[:8]}"
    healthy, failing = f"ok-{prefix}", f"down-{prefix}"
    breaker = RedisCircuitBreaker(
        redis_client, failing, failure_threshold=2, open_seconds=60, key_prefix=prefix
    )
    try:
        monitor = BreakerStateMonitor(redis_client, [healthy, failing], prefix, open_seconds=60)
        await monitor.poll_once()
        assert (_breaker_state(healthy), _breaker_state(failing)) == (0, 0)

        assert await breaker.record("unknown") == "closed"
        assert await breaker.record("unknown") == "open"
        await monitor.poll_once()
        assert (_breaker_state(healthy), _breaker_state(failing)) == (0, 2)

        # With the executors' cool-down over, an open breaker is half-open (next call is
        # a trial): a monitor configured with a zero cool-down reads the same keys so.
        await BreakerStateMonitor(redis_client, [failing], prefix, open_seconds=0).poll_once()
        assert _breaker_state(failing) == 1

        await breaker.reset()
        await monitor.poll_once()
        assert _breaker_state(failing) == 0
    finally:
        await redis_client.delete(*breaker.keys)


# --------------------------------------------------------------------------- PSP latency
@pytest.fixture()
async def sandbox_url() -> AsyncIterator[str]:
    app = create_app("alpha", "sk_test_alpha", "whsec_test_alpha")
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _latency_count(psp: str, operation: str, outcome: str) -> float:
    found = _sample(
        "paystream_psp_request_duration_seconds_count",
        psp=psp,
        operation=operation,
        outcome=outcome,
    )
    return found or 0.0


async def test_every_psp_call_is_timed_by_psp_operation_and_outcome(sandbox_url: str) -> None:
    psp = f"latency-{uuid.uuid4().hex[:8]}"  # a name of its own: counts start at 0

    def count(operation: str, outcome: str) -> float:
        return _latency_count(psp, operation, outcome)

    request = AuthorizeRequest(
        attempt_id=f"att_{uuid.uuid4().hex}",
        payment_id=f"pay_{uuid.uuid4().hex}",
        merchant_id="m_latency",
        amount=1_000,
        currency="USD",
        payment_method="tok_visa",
        capture_method="automatic",
    )
    adapter = SandboxAdapter(psp, sandbox_url, "sk_test_alpha", 2.0)
    faulty_session = aiohttp.ClientSession(headers={"Sandbox-Fault": "5xx"})
    faulty = SandboxAdapter(psp, sandbox_url, "sk_test_alpha", 2.0, session=faulty_session)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    unreachable = SandboxAdapter(psp, f"http://127.0.0.1:{closed_port}", "sk_test_alpha", 2.0)
    try:
        assert not _port_open("127.0.0.1", closed_port)
        assert (await faulty.authorize(request)).outcome == "retryable_error"
        authorized = await adapter.authorize(request)
        assert authorized.outcome == "succeeded"
        assert authorized.psp_reference is not None
        found = await adapter.retrieve(psp_reference=authorized.psp_reference)
        assert found.outcome == "succeeded"
        assert (await unreachable.retrieve(attempt_id="att_nowhere")).outcome == "not_sent"
    finally:
        await adapter.close()
        await unreachable.close()
        await faulty_session.close()

    assert count("authorize", "retryable_error") == 1
    assert count("authorize", "succeeded") == 1
    assert count("retrieve", "succeeded") == 1
    assert count("retrieve", "not_sent") == 1
    assert count("capture", "succeeded") == 0
    latency_sum = _sample(
        "paystream_psp_request_duration_seconds_sum",
        psp=psp, operation="authorize", outcome="succeeded",
    )
    assert latency_sum is not None and latency_sum > 0
