"""The demo checkout load behind ``make run``: publish, wait until settled, summarise."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.settings import Settings
from paystream.client import PaymentsClient
from schemas.money import Money
from sinks import ledger

SETTLED = frozenset(
    {"captured", "declined", "failed", "rejected", "requires_action", "canceled", "refunded",
     "partially_refunded", "pending_verification"}
)
APPROVED = ("tok_visa", "tok_mastercard")
DECLINED = (
    "tok_chargeDeclined",
    "tok_chargeDeclinedInsufficientFunds",
    "tok_chargeDeclinedExpiredCard",
)
CURRENCIES = {
    "USD": (500, 50_000),
    "EUR": (500, 30_000),
    "JPY": (300, 20_000),
    "KWD": (1000, 90_000),
}


@dataclass
class DemoResult:
    run_id: str
    offered: int
    statuses: Counter[str] = field(default_factory=Counter)
    settled: bool = False
    seconds: float = 0.0
    ledger_ok: bool = False
    report: ledger.LedgerReport | None = None


def publish_demo_load(client: PaymentsClient, run_id: str, count: int, seed: int) -> list[str]:
    """Publish ``count`` payments: mostly approved, some declined, some manual captures."""
    rng = random.Random(seed)  # noqa: S311 - demo data, not security
    payment_ids: list[str] = []
    for n in range(count):
        payment_id = f"pay_{run_id}_{n:05d}"
        merchant_id = f"m_demo_{n % 3 + 1}"
        currency = rng.choice(list(CURRENCIES))
        low, high = CURRENCIES[currency]
        token = rng.choice(DECLINED) if rng.random() < 0.2 else rng.choice(APPROVED)
        manual = rng.random() < 0.25
        client.authorize(
            merchant_id=merchant_id,
            payment_id=payment_id,
            idempotency_key=f"{payment_id}-authorize",
            amount=rng.randint(low, high),
            currency=currency,
            payment_method=token,
            capture_method="manual" if manual else "automatic",
            metadata={"order_id": f"order-{n}"},
        )
        if manual:
            client.capture(
                merchant_id=merchant_id,
                payment_id=payment_id,
                idempotency_key=f"{payment_id}-capture",
            )
        payment_ids.append(payment_id)
    client.flush()
    return payment_ids


async def _statuses(pool: asyncpg.Pool, prefix: str) -> Counter[str]:
    rows = await pool.fetch(
        "SELECT status, count(*) AS n FROM payment_status WHERE payment_id LIKE $1 "
        "GROUP BY status",
        prefix + "%",
    )
    return Counter({row["status"]: int(row["n"]) for row in rows})


async def wait_and_summarise(
    settings: Settings, run_id: str, count: int, wait_seconds: float, console: Console
) -> DemoResult:
    result = DemoResult(run_id=run_id, offered=count)
    prefix = f"pay_{run_id}_"
    started = time.monotonic()
    pool = await asyncpg.create_pool(settings.pg_dsn, min_size=1, max_size=2)
    try:
        with Progress(
            TextColumn("[bold]settling payments"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("settle", total=count)
            while time.monotonic() - started < wait_seconds:
                result.statuses = await _statuses(pool, prefix)
                done = sum(n for status, n in result.statuses.items() if status in SETTLED)
                progress.update(task, completed=done)
                if done >= count:
                    result.settled = True
                    break
                await asyncio.sleep(0.25)
        result.seconds = time.monotonic() - started
        async with pool.acquire() as conn:
            result.report = await ledger.verify(conn)
            totals = await ledger.totals_by_currency(conn)
        result.ledger_ok = result.report.ok
    finally:
        await pool.close()

    table = Table(title=f"demo run {run_id}: {count} payments")
    table.add_column("final status")
    table.add_column("payments", justify="right")
    for status, n in sorted(result.statuses.items()):
        table.add_row(status, str(n))
    console.print(table)
    money = Table(title="ledger totals per currency")
    money.add_column("currency")
    money.add_column("captured", justify="right")
    money.add_column("fees", justify="right")
    money.add_column("merchant wallets", justify="right")
    for currency, total in sorted(totals.items()):
        money.add_row(
            currency,
            str(Money.of(total.captured, currency)),
            str(Money.of(total.fees, currency)),
            str(Money.of(total.merchant_wallets, currency)),
        )
    console.print(money)
    console.print(
        f"settled: {'yes' if result.settled else 'NO'} in {result.seconds:.1f}s; "
        f"ledger balanced: {'yes' if result.ledger_ok else 'NO'}"
    )
    if result.report is not None and not result.report.ok:
        for violation in result.report.violations:
            console.print(f"[red]ledger violation:[/red] {violation}")
    return result


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]
