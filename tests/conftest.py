"""Shared fixtures: a real stack (Tansu broker, PostgreSQL, Redis, PSP sandbox, worker).

PostgreSQL: a fresh throwaway database on the server named by PAYSTREAM_TEST_PG_DSN
(default: the local server at 127.0.0.1:5432), or embedded pgserver if none answers.
Redis: PAYSTREAM_TEST_REDIS_URL (default redis://127.0.0.1:6379/15), or embedded.
The broker is always a fresh embedded Tansu on a free port, so tests never share topics.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import asyncpg
import pytest

from config.settings import EMBEDDED, Settings
from ops.stack import EmbeddedStack, free_port, port_open

ADMIN_DSN = os.environ.get("PAYSTREAM_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PAYSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(url: str, default_port: int) -> bool:
    parsed = urlparse(url)
    return port_open(parsed.hostname or "127.0.0.1", parsed.port or default_port)


def _with_database(dsn: str, database: str) -> str:
    parsed = urlparse(dsn)
    return urlunparse(parsed._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of a fresh database for this test session (dropped afterwards)."""
    if not _reachable(ADMIN_DSN, 5432):
        yield EMBEDDED
        return
    name = f"paystream_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(ADMIN_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(ADMIN_DSN, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def stack_settings(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    psp_port = free_port()
    return Settings(
        kafka_bootstrap_servers=EMBEDDED,
        pg_dsn=pg_dsn,
        redis_url=REDIS_URL if _reachable(REDIS_URL, 6379) else EMBEDDED,
        web_port=free_port(),
        data_dir=Path(tmp_path_factory.mktemp("stack")),
        embedded_kafka_port=free_port(),
        embedded_redis_port=free_port(),
        psp_alpha_url=f"http://127.0.0.1:{psp_port}",
        psp_beta_url=f"http://127.0.0.1:{free_port()}",
        psp_sandbox_latency_ms=2.0,
        psp_timeout_seconds=2.0,
        # Short lookup tiers and enough lookups that a flaky PSP (faults on every call,
        # lookups included) always resolves within the test's patience.
        verify_delays_seconds=[0.2, 0.5, 1.0],
        verify_max_lookups=15,
        # Short retry tiers: a transient PSP failure is retried within about a second.
        retry_delays_seconds=[0.5, 1.0, 2.0],
        retry_max_attempts=4,
        # Authorizations expire quickly so the expiry sweep is testable; tests capture
        # well within this.
        authorization_validity_seconds=20,
        expiry_sweep_interval_seconds=1.0,
        # Merchant webhooks retried within seconds, not days.
        webhook_retry_schedule_seconds=[0.2, 0.5, 1.0, 2.0],
        webhook_dispatch_interval_seconds=0.1,
        fee_refresh_seconds=1.0,
        # A payment pending verification for 5 s is stuck: the sweep re-verifies it.
        stuck_after_seconds=5.0,
        stuck_sweep_interval_seconds=1.0,
        app_id=f"paystream-test-{uuid.uuid4().hex[:6]}",
    )


@pytest.fixture(scope="session")
def stack(stack_settings: Settings) -> Iterator[EmbeddedStack]:
    """The whole pipeline, started once per session."""
    running = EmbeddedStack(stack_settings)
    running.start(log=lambda _msg: None)
    try:
        yield running
    finally:
        running.stop(log=lambda _msg: None)


@pytest.fixture(scope="session")
def live(stack: EmbeddedStack) -> Settings:
    """Concrete settings (real addresses) of the running stack."""
    return stack.concrete_settings()


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until ``check()`` returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"condition not met within {timeout}s (last value: {last!r})")


async def async_wait_for(check: Callable[[], Any], within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    pytest.fail(f"condition not met within {within}s (last value: {last!r})")
