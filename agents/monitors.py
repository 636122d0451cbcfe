"""Periodic gauges every worker exports at ``/metrics``: consumer lag, ledger imbalance and
PSP circuit-breaker state.

Plain asyncio (no Faust): each monitor has

* ``await poll_once()``: measure once and set its gauge; raises when it cannot measure
  (the gauge then keeps its previous samples);
* ``await run_forever(interval, stop)``: ``poll_once`` every ``interval`` seconds until
  ``stop`` is set; a failed poll is logged and the loop goes on.

Built from what a worker already has::

    LagMonitor(settings)                               # group settings.app_id
    LedgerImbalanceMonitor(pool)                        # asyncpg pool of the ledger
    BreakerStateMonitor(redis, ["alpha", "beta"], settings.app_id,
                        open_seconds=settings.psp_breaker_open_seconds)

Every worker exports the same values (they describe shared state: the group, the ledger,
the breakers in Redis), so dashboards aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from decimal import Decimal
from typing import Final

import asyncpg
import redis.asyncio as aioredis

from config.settings import Settings
from observability import metrics
from psp.breaker import BreakerState, RedisCircuitBreaker
from topics import offsets

log = logging.getLogger("paystream.monitors")

BREAKER_STATE_VALUES: Final[dict[BreakerState, int]] = {"closed": 0, "half_open": 1, "open": 2}
"""Value of ``paystream_psp_breaker_state`` per breaker state."""


class Monitor(ABC):
    """A measurement taken periodically; see the module docstring."""

    name: str = "monitor"

    @abstractmethod
    async def poll_once(self) -> None:
        """Measure once and set the gauge."""

    async def run_forever(self, interval: float, stop: asyncio.Event) -> None:
        """``poll_once`` every ``interval`` seconds until ``stop`` is set (first poll now).

        A failing poll is logged and retried at the next interval; cancellation ends the
        loop at once."""
        if interval <= 0:
            raise ValueError("interval must be positive")
        while not stop.is_set():
            try:
                await self.poll_once()
            except Exception:
                log.exception("%s: poll failed; next try in %ss", self.name, interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


class LagMonitor(Monitor):
    """``paystream_consumer_lag{group, topic, partition}`` = end offset - committed offset.

    Covers the worker's consumer group (``settings.app_id``) and any ``groups`` given. Each
    group's offsets are read with :func:`topics.offsets.show` (the same numbers as
    ``paystream offsets show``), in a thread because the confluent-kafka admin client
    blocks. Partitions without a committed offset (or whose end offset the broker cannot
    give) have no sample; samples of partitions that disappear are removed.

    On the embedded Tansu broker the end offset (high watermark) is the base offset of the
    last record batch + 1, not the offset after its last record, so the lag reads low by up
    to one batch (and a group that has read everything can read as "past the end"). That is
    the broker's answer and is reported as such; only a negative difference is shown as 0,
    since a gauge of records behind cannot be below zero. Apache Kafka reports exact ends.
    """

    name = "consumer lag"

    def __init__(
        self, settings: Settings, groups: Iterable[str] = (), *, timeout: float = 10.0
    ) -> None:
        self._settings = settings
        self.groups: tuple[str, ...] = tuple(dict.fromkeys([settings.app_id, *groups]))
        self._timeout = timeout
        self._samples: dict[str, set[tuple[str, str, str]]] = {}

    async def poll_once(self) -> None:
        failures: list[str] = []
        for group in self.groups:
            try:
                rows = await asyncio.to_thread(
                    offsets.show, self._settings, group, self._timeout
                )
            except offsets.OffsetsError as exc:
                failures.append(f"group {group!r}: {exc}")
                continue
            current: set[tuple[str, str, str]] = set()
            for row in rows:
                if row.lag is None:
                    continue
                labels = (group, row.topic, str(row.partition))
                metrics.CONSUMER_LAG.labels(*labels).set(max(row.lag, 0))
                current.add(labels)
            for gone in self._samples.get(group, set()) - current:
                metrics.CONSUMER_LAG.remove(*gone)
            self._samples[group] = current
        if failures:
            raise offsets.OffsetsError("; ".join(failures))


_IMBALANCE_SQL = """
SELECT currency::text AS currency, sum(amount) AS total
  FROM ledger_entries
 GROUP BY currency
"""


def _exact(total: int | Decimal | None) -> int:
    if total is None:
        return 0
    if isinstance(total, Decimal):
        if total != total.to_integral_value():
            raise ValueError(f"non-integral ledger sum {total}")
        return int(total)
    return total


class LedgerImbalanceMonitor(Monitor):
    """``paystream_ledger_imbalance_minor_units{currency}`` = the sum of every ledger entry
    of that currency (debits positive, credits negative): 0 while the ledger balances.

    One aggregate over ``ledger_entries`` (no joins, unlike ``paystream ledger verify``,
    which also checks each transaction and account). One sample per currency the journal
    holds; an empty journal exports no sample (dashboards show it with ``or vector(0)``).
    """

    name = "ledger imbalance"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._currencies: set[str] = set()

    async def poll_once(self) -> None:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_IMBALANCE_SQL)
        current: set[str] = set()
        for row in rows:
            currency = str(row["currency"])
            metrics.LEDGER_IMBALANCE.labels(currency).set(_exact(row["total"]))
            current.add(currency)
        for gone in self._currencies - current:
            metrics.LEDGER_IMBALANCE.remove(gone)
        self._currencies = current


class BreakerStateMonitor(Monitor):
    """``paystream_psp_breaker_state{psp}``: 0 closed, 1 half-open, 2 open.

    Reads the shared breaker state in Redis through :meth:`RedisCircuitBreaker.state`
    (read-only), so it agrees with what the executors see: an open breaker whose cool-down
    (``open_seconds``, the executors' ``PAYSTREAM_PSP_BREAKER_OPEN_SECONDS``) is over reads
    as half-open. ``key_prefix`` is the breakers' prefix (the app id).
    """

    name = "breaker state"

    def __init__(
        self,
        redis: aioredis.Redis,
        psp_names: Iterable[str],
        key_prefix: str = "paystream",
        *,
        open_seconds: float = 5.0,
    ) -> None:
        self._breakers = [
            RedisCircuitBreaker(redis, psp, open_seconds=open_seconds, key_prefix=key_prefix)
            for psp in dict.fromkeys(psp_names)
        ]

    async def poll_once(self) -> None:
        for breaker in self._breakers:
            state = await breaker.state()
            metrics.BREAKER_STATE.labels(breaker.psp).set(BREAKER_STATE_VALUES[state])
