"""Ledger throughput benchmark (not a test): postings per second against real PostgreSQL.

Scenarios, each ``postings`` postings offered in batches of ``batch`` on one connection:

* ``captures, spread``: :func:`sinks.ledger.post_captures` across many merchants (the
  pipeline's hot path; set-based, three statements per batch).
* ``captures, hot merchant``: the same, every posting on ONE merchant wallet.
* ``lifecycle, spread`` / ``lifecycle, hot merchant``: authorization, capture against the
  hold, and a partial refund per payment (one statement per posting, guards included).

It ends with :func:`sinks.ledger.verify` over everything posted. By default it creates a
throwaway database on the server named by ``dsn`` (``CREATE DATABASE`` rights needed) and
drops it afterwards, so it never adds fake money to a real ledger; ``fresh_database=False``
runs in the database of ``dsn`` itself (migrated first), with ids unique to the run.

Run: ``python -m benchmarks.ledger_bench postgresql://postgres@127.0.0.1:5432/test``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from schemas.money import fee_for
from sinks.ledger import (
    AuthorizationHold,
    CapturePosting,
    HoldCapture,
    RefundPosting,
    post_authorizations,
    post_captures,
    post_hold_captures,
    post_refunds,
    verify,
)
from sinks.migrations import migrate

__all__ = ["BenchResult", "ScenarioResult", "run_ledger_bench"]

T = TypeVar("T")
T0 = datetime(2024, 5, 1, tzinfo=UTC)
FEE_BPS = 290
FEE_FIXED = 30


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    name: str
    offered: int
    """Postings sent."""
    applied: int
    """Postings that made a new journal transaction."""
    seconds: float

    @property
    def per_second(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class BenchResult:
    database: str
    postings: int
    batch: int
    scenarios: list[ScenarioResult]
    verify_ok: bool
    violations: int
    verify_seconds: float
    transactions: int
    entries: int


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _timed(
    name: str,
    offered: int,
    work: Callable[[], Awaitable[int]],
) -> ScenarioResult:
    start = time.perf_counter()
    applied = await work()
    return ScenarioResult(name, offered, applied, time.perf_counter() - start)


def _captures(run: str, count: int, merchants: int, rng: random.Random) -> list[CapturePosting]:
    postings = []
    for i in range(count):
        amount = rng.randint(100, 500_000)
        postings.append(
            CapturePosting(
                event_id=f"{run}:cap:{i}",
                payment_id=f"{run}:pay:{i}",
                merchant_id=f"{run}:m{rng.randrange(merchants)}",
                amount=amount,
                fee=fee_for(amount, FEE_BPS, FEE_FIXED),
                currency="USD",
                occurred_at=T0,
            )
        )
    return postings


async def _post_capture_batches(
    conn: asyncpg.Connection, postings: Sequence[CapturePosting], batch: int
) -> int:
    applied = 0
    for chunk in _batches(postings, batch):
        applied += await post_captures(conn, chunk)
    return applied


async def _lifecycle(
    conn: asyncpg.Connection,
    run: str,
    payments: int,
    merchants: int,
    batch: int,
    rng: random.Random,
) -> int:
    """Authorize, capture against the hold (partly), refund part: 3 postings per payment."""
    auths: list[AuthorizationHold] = []
    captures: list[HoldCapture] = []
    refunds: list[RefundPosting] = []
    for i in range(payments):
        merchant = f"{run}:m{rng.randrange(merchants)}"
        amount = rng.randint(1_000, 500_000)
        captured = amount - rng.randint(0, amount // 10)
        common = {"merchant_id": merchant, "currency": "USD", "occurred_at": T0}
        payment = f"{run}:pay:{i}"
        auths.append(
            AuthorizationHold(
                event_id=f"{run}:auth:{i}", payment_id=payment, amount=amount, **common
            )
        )
        captures.append(
            HoldCapture(
                event_id=f"{run}:hcap:{i}",
                payment_id=payment,
                amount=captured,
                fee=fee_for(captured, FEE_BPS, FEE_FIXED),
                **common,
            )
        )
        refunds.append(
            RefundPosting(
                event_id=f"{run}:ref:{i}",
                payment_id=payment,
                refund_id=f"{run}:re:{i}",
                amount=captured // 2,
                **common,
            )
        )
    applied = 0
    for chunk in _batches(auths, batch):
        applied += (await post_authorizations(conn, chunk)).posted
    for chunk_c in _batches(captures, batch):
        applied += (await post_hold_captures(conn, chunk_c)).posted
    for chunk_r in _batches(refunds, batch):
        applied += (await post_refunds(conn, chunk_r)).posted
    return applied


async def _run(dsn: str, postings: int, batch: int, merchants: int) -> BenchResult:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        run = f"bench{secrets.token_hex(4)}"
        rng = random.Random(20240501)  # reproducible workload
        scenarios: list[ScenarioResult] = []

        spread = _captures(f"{run}s", postings, merchants, rng)
        scenarios.append(
            await _timed(
                "captures, spread",
                len(spread),
                lambda: _post_capture_batches(conn, spread, batch),
            )
        )
        hot = _captures(f"{run}h", postings, 1, rng)
        scenarios.append(
            await _timed(
                "captures, hot merchant",
                len(hot),
                lambda: _post_capture_batches(conn, hot, batch),
            )
        )
        payments = max(1, postings // 3)
        scenarios.append(
            await _timed(
                "lifecycle, spread",
                3 * payments,
                lambda: _lifecycle(conn, f"{run}ls", payments, merchants, batch, rng),
            )
        )
        scenarios.append(
            await _timed(
                "lifecycle, hot merchant",
                3 * payments,
                lambda: _lifecycle(conn, f"{run}lh", payments, 1, batch, rng),
            )
        )
        start = time.perf_counter()
        report = await verify(conn)
        verify_seconds = time.perf_counter() - start
        return BenchResult(
            database=urlsplit(dsn).path.lstrip("/"),
            postings=postings,
            batch=batch,
            scenarios=scenarios,
            verify_ok=report.ok,
            violations=len(report.violations),
            verify_seconds=verify_seconds,
            transactions=report.transactions,
            entries=report.entries,
        )
    finally:
        await conn.close()


async def run_ledger_bench(
    dsn: str,
    postings: int = 20_000,
    batch: int = 1_000,
    *,
    merchants: int = 1_000,
    fresh_database: bool = True,
) -> BenchResult:
    """Run every scenario and :func:`verify`; see the module docstring."""
    if postings < 1 or batch < 1 or merchants < 1:
        raise ValueError("postings, batch and merchants must be positive")
    if not fresh_database:
        return await _run(dsn, postings, batch, merchants)
    name = f"paystream_bench_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        return await _run(_with_database(dsn, name), postings, batch, merchants)
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def format_result(result: BenchResult) -> str:
    """A printable report of one benchmark run."""
    lines = [
        f"ledger bench: {result.postings} postings per scenario, batches of {result.batch} "
        f"(database {result.database})",
        f"{'scenario':<26}{'offered':>9}{'applied':>9}{'seconds':>10}{'postings/s':>12}",
    ]
    for s in result.scenarios:
        lines.append(
            f"{s.name:<26}{s.offered:>9}{s.applied:>9}{s.seconds:>10.2f}{s.per_second:>12,.0f}"
        )
    lines.append(
        f"verify: {'ok' if result.verify_ok else 'VIOLATIONS'} "
        f"({result.violations} violations, {result.transactions} transactions, "
        f"{result.entries} entries, {result.verify_seconds:.2f}s)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 1_000
    print(format_result(asyncio.run(run_ledger_bench(target, count, size))))
