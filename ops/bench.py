"""``paystream bench ...``: benchmark entry points for the CLI (printable reports)."""

from __future__ import annotations

import asyncio

from benchmarks.ledger_bench import format_result, run_ledger_bench

__all__ = ["bench_ledger"]


def bench_ledger(dsn: str, postings: int = 20_000, batch: int = 1_000) -> str:
    """Run the ledger benchmark on the server of ``dsn``; return a printable report.

    It creates a throwaway database there (``CREATE DATABASE`` rights needed) and drops it
    afterwards, so the ledger of ``dsn`` itself is never touched.
    """
    return format_result(asyncio.run(run_ledger_bench(dsn, postings, batch)))
