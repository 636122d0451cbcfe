"""A tiny SQL migration runner for the sinks' PostgreSQL schema.

Migrations are the files ``sinks/sql/NNNN_name.sql`` (package data, found relative to
this module), applied in name order, each in its own transaction, and recorded in
``schema_migrations`` with a SHA-256 of the file. Running :func:`migrate` again applies
only what is new; two processes running it at once are serialised by a PostgreSQL
advisory lock, so each file is applied exactly once. An already-applied file whose
content changed is refused (:class:`MigrationError`): write a new migration instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

__all__ = ["MIGRATIONS_LOCK_KEY", "Migration", "MigrationError", "load_migrations", "migrate"]

MIGRATIONS_LOCK_KEY = 0x7061_7973_6D69_67  # "paysmig": session advisory lock id (bigint)
"""Advisory lock key held while migrating (``pg_advisory_lock``)."""

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(RuntimeError):
    """The migrations on disk disagree with what the database recorded."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    """File name without ``.sql``, e.g. ``0001_ledger``."""
    sql: str
    checksum: str
    """Hex SHA-256 of the file's bytes."""


def _sql_dir() -> Path:
    # Relative to this file rather than importlib.resources.files("sinks"): a namespace
    # package of the same name (e.g. tests/sinks on sys.path under pytest) could shadow it.
    return Path(__file__).resolve().parent / "sql"


def load_migrations(directory: Path | Traversable | None = None) -> list[Migration]:
    """The migration files of ``directory`` (default: the packaged ``sinks/sql``), in order."""
    root = _sql_dir() if directory is None else directory
    found: list[Migration] = []
    numbers: dict[str, str] = {}
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        number = match.group(1)
        if number in numbers:
            raise MigrationError(
                f"two migrations share number {number}: {numbers[number]} and {entry.name}"
            )
        numbers[number] = entry.name
        data = entry.read_bytes()
        found.append(
            Migration(
                version=entry.name.removesuffix(".sql"),
                sql=data.decode("utf-8"),
                checksum=hashlib.sha256(data).hexdigest(),
            )
        )
    found.sort(key=lambda m: m.version)
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _migrate_conn(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATIONS_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        recorded: dict[str, str] = {row["version"]: row["checksum"] for row in rows}
        for migration in migrations:
            checksum = recorded.get(migration.version)
            if checksum is not None:
                if checksum != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} changed after it was applied "
                        "(checksum mismatch); add a new migration instead of editing it"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATIONS_LOCK_KEY)
    return applied_now


async def migrate(
    conn_or_pool: asyncpg.Connection | asyncpg.Pool,
    *,
    directory: Path | Traversable | None = None,
) -> list[str]:
    """Apply every migration not applied yet; return the versions applied by this call.

    Idempotent (a second call returns ``[]``) and safe to run from several processes at
    once (a session advisory lock serialises them). Accepts a connection or a pool; the
    connection must not be inside a transaction.
    """
    migrations = load_migrations(directory)
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn:
            return await _migrate_conn(conn, migrations)
    return await _migrate_conn(conn_or_pool, migrations)
