"""The migration runner: ordered, idempotent, safe under concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from sinks.migrations import MigrationError, load_migrations, migrate

FreshDatabase = Callable[[], Awaitable[str]]


def test_packaged_migrations_are_found() -> None:
    versions = [m.version for m in load_migrations()]
    assert versions[0] == "0001_ledger"
    assert versions == sorted(versions)


async def test_migrate_is_idempotent(fresh_database: FreshDatabase) -> None:
    dsn = await fresh_database()
    conn = await asyncpg.connect(dsn)
    try:
        applied = await migrate(conn)
        assert applied == [m.version for m in load_migrations()]
        assert await migrate(conn) == []
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY 1")
        assert [r["version"] for r in rows] == applied
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'ledger_%' ORDER BY 1"
        )
        assert [t["tablename"] for t in tables] == [
            "ledger_accounts",
            "ledger_entries",
            "ledger_holds",
            "ledger_payments",
            "ledger_transactions",
        ]
    finally:
        await conn.close()


async def test_concurrent_migrate_applies_once(fresh_database: FreshDatabase) -> None:
    dsn = await fresh_database()
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=4)
    try:
        results = await asyncio.gather(*(migrate(pool) for _ in range(4)))
        expected = [m.version for m in load_migrations()]
        assert sorted(results, key=len) == [[], [], [], expected]
        async with pool.acquire() as conn:
            count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            assert count == len(expected)
            # the advisory lock is released
            assert (
                await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
                == 0
            )
    finally:
        await pool.close()


async def test_new_files_apply_in_order_and_edits_are_refused(
    fresh_database: FreshDatabase, tmp_path: Path
) -> None:
    dsn = await fresh_database()
    (tmp_path / "0002_b.sql").write_text("INSERT INTO t VALUES (2);")
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE t (n int);")
    (tmp_path / "README.md").write_text("not a migration")
    conn = await asyncpg.connect(dsn)
    try:
        assert await migrate(conn, directory=tmp_path) == ["0001_a", "0002_b"]
        (tmp_path / "0003_c.sql").write_text("INSERT INTO t VALUES (3);")
        assert await migrate(conn, directory=tmp_path) == ["0003_c"]
        assert [r["n"] for r in await conn.fetch("SELECT n FROM t ORDER BY n")] == [2, 3]

        (tmp_path / "0004_bad.sql").write_text("INSERT INTO t VALUES (4); SELECT 1/0;")
        with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
            await migrate(conn, directory=tmp_path)
        # the failed migration left nothing behind and is not recorded
        assert await conn.fetchval("SELECT count(*) FROM t WHERE n = 4") == 0
        (tmp_path / "0004_bad.sql").unlink()

        (tmp_path / "0002_b.sql").write_text("INSERT INTO t VALUES (20);")
        with pytest.raises(MigrationError, match="0002_b changed"):
            await migrate(conn, directory=tmp_path)

        (tmp_path / "0003_d.sql").write_text("SELECT 1;")
        with pytest.raises(MigrationError, match="share number 0003"):
            await migrate(conn, directory=tmp_path)
    finally:
        await conn.close()
