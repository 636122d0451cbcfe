"""Fixtures for the sinks tests: a throwaway PostgreSQL database per test session.

The admin DSN comes from ``PAYSTREAM_TEST_PG_DSN`` (default: the local ``test`` database,
user ``postgres``). The session creates ``paystream_test_<hex>``, migrates it, and drops it
at the end. Tests that need an empty ledger use ``ledger_conn`` (it truncates the ledger
tables as superuser, bypassing the append-only triggers the application can't bypass).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from sinks.migrations import migrate

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"

LEDGER_TABLES = (
    "ledger_entries",
    "ledger_transactions",
    "ledger_accounts",
    "ledger_holds",
    "ledger_payments",
    "merchant_fees",
)


def admin_dsn() -> str:
    return os.environ.get("PAYSTREAM_TEST_PG_DSN", DEFAULT_ADMIN_DSN)


def dsn_for(database: str) -> str:
    """The admin DSN pointed at another database (same host, user, options)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(admin_dsn())
    return urlunsplit(parts._replace(path=f"/{database}"))


async def create_database(prefix: str = "paystream_test") -> str:
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def drop_database(name: str) -> None:
    admin = await asyncpg.connect(admin_dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def reset_ledger(conn: asyncpg.Connection) -> None:
    """Empty the ledger (superuser only: the journal's triggers refuse TRUNCATE)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(f"TRUNCATE {', '.join(LEDGER_TABLES)} RESTART IDENTITY")


@pytest.fixture(scope="session")
async def fresh_database() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """A factory of extra empty databases (dropped at the end of the session)."""
    created: list[str] = []

    async def make() -> str:
        name = await create_database()
        created.append(name)
        return dsn_for(name)

    yield make
    for name in created:
        await drop_database(name)


@pytest.fixture(scope="session")
async def ledger_dsn() -> AsyncIterator[str]:
    name = await create_database()
    dsn = dsn_for(name)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        await drop_database(name)


@pytest.fixture(scope="session")
async def ledger_pool(ledger_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(ledger_dsn, min_size=1, max_size=6)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def ledger_conn(ledger_pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection to an empty, migrated ledger."""
    async with ledger_pool.acquire() as conn:
        await reset_ledger(conn)
        yield conn


@pytest.fixture(scope="session")
def ledger_reset() -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """:func:`reset_ledger`, for tests (hypothesis) that can't use function fixtures."""
    return reset_ledger
