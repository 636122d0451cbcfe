"""Sends the webhook outbox to merchants: signed POSTs, retried on the published schedule.

A :class:`WebhookDispatcher` claims due ``webhook_deliveries`` rows (``FOR UPDATE SKIP
LOCKED``) and, in the same statement, counts the attempt and pushes ``next_attempt_at``
forward by a lease (twice the HTTP timeout, plus a margin). So any number of workers can
run dispatchers on the same database: a row is claimed by one of them at a time, and the
rows of a worker that crashed mid-send become due again when their lease runs out (the
merchant may then see that attempt twice: delivery is at least once, and every attempt of a
delivery carries the same ``Paystream-Event-Id``).

Each attempt POSTs the stored payload bytes with

- ``Content-Type: application/json``
- ``Paystream-Signature: t=<unix seconds>,v1=<hex>`` (Stripe's scheme, :mod:`schemas.signatures`;
  signed afresh per attempt; during a secret rotation one ``v1=`` per secret)
- ``Paystream-Event-Id: <event id>`` and ``Paystream-Delivery-Attempt: <n>``

and is logged in ``webhook_attempts``. A 2xx answer delivers; anything else (another
status, a redirect, a timeout, a connection error) schedules the next attempt after
``webhook_retry_schedule_seconds[k - 1]`` (``k``: attempts since the schedule began; a
replay starts it again), and once the schedule is exhausted the delivery is ``dead``:
``on_dead`` is awaited inside the transaction that marks it, so if it fails (the DLQ topic
is unreachable) the delivery stays pending and is tried again after its lease.

Each dispatcher sends at most ``webhook_max_in_flight_per_endpoint`` requests to one
endpoint at a time (the claim itself only takes as many rows per endpoint as there are
free slots, so nothing claimed waits for a slot while its lease runs). The limit is per
dispatcher: N workers may have up to N times as many requests open to one endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict

from config.settings import Settings
from observability import metrics
from schemas.dlq import DlqEnvelope, scrub_payload
from schemas.signatures import MERCHANT_ATTEMPT_HEADER as ATTEMPT_HEADER
from schemas.signatures import MERCHANT_EVENT_ID_HEADER as EVENT_ID_HEADER
from schemas.signatures import MERCHANT_SIGNATURE_HEADER as SIGNATURE_HEADER
from schemas.signatures import compute_signature
from sinks.webhook_endpoints import redact_url
from topics.catalog import EVENTS, WEBHOOKS_DLQ

if TYPE_CHECKING:
    from topics.publisher import EventPublisher

__all__ = [
    "ATTEMPT_HEADER",
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "DeadDelivery",
    "WebhookDispatcher",
    "kafka_dead_letter",
    "signature_header",
]

log = logging.getLogger(__name__)

USER_AGENT = "paystream-webhooks/1.0"
LEASE_MARGIN_S = 5.0
"""Added to twice the HTTP timeout: time to record the attempt before the lease runs out."""
DEFAULT_BATCH_SIZE = 500
MIN_INTERVAL_S = 0.01
MAX_RESPONSE_BYTES = 64 * 1024


class DeadDelivery(BaseModel):
    """A delivery whose retry schedule is exhausted (what ``on_dead`` receives)."""

    model_config = ConfigDict(frozen=True)

    delivery_id: int
    event_id: str
    endpoint_id: int
    endpoint_url: str
    """As registered (may hold credentials): log :func:`~sinks.webhook_endpoints.redact_url`."""
    payment_id: str
    merchant_id: str
    event_type: str
    payload: bytes
    """The exact JSON bytes every attempt sent."""
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: AwareDatetime
    first_attempt_at: AwareDatetime | None
    """First attempt of the current schedule (since the last replay, if any)."""
    dead_at: AwareDatetime


def signature_header(payload: bytes, secrets: Sequence[str], timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex>[,v1=<hex>]``: one signature per secret, in order."""
    parts = [f"t={timestamp}"]
    parts.extend(f"v1={compute_signature(payload, secret, timestamp)}" for secret in secrets)
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class _Claimed:
    delivery_id: int
    event_id: str
    endpoint_id: int
    url: str
    secrets: tuple[str, ...]
    payment_id: str
    merchant_id: str
    event_type: str
    payload: bytes
    attempt: int
    """This attempt's number (the delivery's ``attempts`` after the claim): fencing token."""
    schedule_offset: int


@dataclass(frozen=True, slots=True)
class _Result:
    attempted_at: datetime
    status_code: int | None
    error: str | None
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


_CLAIM = """
WITH slots AS (
    SELECT e.id, e.url, e.secret,
           CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END
               AS previous_secret,
           $1::int - coalesce(b.used, 0) AS free
      FROM merchant_endpoints e
      LEFT JOIN unnest($2::bigint[], $3::int[]) AS b(endpoint_id, used)
             ON b.endpoint_id = e.id
     WHERE e.enabled
),
picked AS (
    SELECT s.id AS endpoint_id, s.url, s.secret, s.previous_secret,
           d.id, d.next_attempt_at
      FROM slots s
     CROSS JOIN LATERAL (
           SELECT w.id, w.next_attempt_at
             FROM webhook_deliveries w
            WHERE w.endpoint_id = s.id
              AND w.status = 'pending'
              AND w.next_attempt_at <= now()
            ORDER BY w.next_attempt_at, w.id
            LIMIT greatest(s.free, 0)
              FOR UPDATE OF w SKIP LOCKED
           ) d
     WHERE s.free > 0
     ORDER BY d.next_attempt_at, d.id
     LIMIT $4
)
UPDATE webhook_deliveries w
   SET attempts = w.attempts + 1,
       next_attempt_at = now() + make_interval(secs => $5::double precision)
  FROM picked p
 WHERE w.id = p.id
RETURNING w.id, w.event_id, w.endpoint_id, w.payment_id, w.merchant_id, w.event_type,
          w.payload, w.attempts, w.schedule_offset, p.url, p.secret, p.previous_secret
"""

_RECORD_ATTEMPT = """
INSERT INTO webhook_attempts (delivery_id, attempt, attempted_at, status_code, latency_ms, error)
VALUES ($1, $2, $3, $4, $5, $6)
"""

_RECORD_RESULT = """
WITH attempt AS (
    INSERT INTO webhook_attempts
           (delivery_id, attempt, attempted_at, status_code, latency_ms, error)
    VALUES ($1, $2, $3, $4, $5, $6)
)
UPDATE webhook_deliveries
   SET status = $7::text,
       next_attempt_at = CASE WHEN $7::text = 'pending'
                              THEN clock_timestamp() + make_interval(secs => $8::double precision)
                         END,
       last_status_code = $4,
       last_error = $6,
       delivered_at = CASE WHEN $7::text = 'delivered' THEN clock_timestamp()
                           ELSE delivered_at END
 WHERE id = $1 AND attempts = $2 AND status = 'pending'
RETURNING id
"""

_MARK_DEAD = """
UPDATE webhook_deliveries d
   SET status = 'dead', next_attempt_at = NULL, last_status_code = $3, last_error = $4
 WHERE d.id = $1 AND d.attempts = $2 AND d.status = 'pending'
RETURNING d.created_at, clock_timestamp() AS dead_at,
          (SELECT min(a.attempted_at) FROM webhook_attempts a
            WHERE a.delivery_id = d.id AND a.attempt > d.schedule_offset) AS first_attempt_at
"""

_BACKLOG = "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"


class WebhookDispatcher:
    """Delivers due webhooks from PostgreSQL; see the module docstring.

    Use :meth:`run_forever` in a worker (it closes its HTTP session when it returns), or
    :meth:`run_once` and then :meth:`close` (or ``async with``).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        on_dead: Callable[[DeadDelivery], Awaitable[None]] | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._on_dead = on_dead
        self._batch_size = max(1, batch_size)
        self._per_endpoint = max(1, settings.webhook_max_in_flight_per_endpoint)
        self._lease_s = 2 * settings.webhook_timeout_seconds + LEASE_MARGIN_S
        self._schedule = list(settings.webhook_retry_schedule_seconds)
        self._in_flight: dict[int, int] = {}
        self._claim_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> WebhookDispatcher:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (a later run opens a new one)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def in_flight(self) -> dict[int, int]:
        """Requests open per endpoint id, now (a copy)."""
        return {k: v for k, v in self._in_flight.items() if v}

    # ------------------------------------------------------------------ running
    async def run_once(self) -> int:
        """Claim what is due (within the free per-endpoint slots), attempt each delivery,
        record the results; return the number of deliveries attempted."""
        await self.update_backlog()
        claimed = await self._claim()
        if claimed:
            await asyncio.gather(*(self._deliver(item) for item in claimed))
        return len(claimed)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set: poll every ``webhook_dispatch_interval_seconds``
        (sooner when a request finishes and frees a slot). An iteration's error is logged
        and the loop goes on. On stop, requests already sent are finished and recorded."""
        interval = max(MIN_INTERVAL_S, self._settings.webhook_dispatch_interval_seconds)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        wake = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            wake.set()

        last_backlog = float("-inf")
        try:
            while not stop.is_set():
                wake.clear()
                full = False
                try:
                    if loop.time() - last_backlog >= interval:
                        last_backlog = loop.time()
                        await self.update_backlog()
                    claimed = await self._claim()
                    for item in claimed:
                        task = asyncio.create_task(
                            self._deliver(item), name=f"webhook-{item.delivery_id}"
                        )
                        tasks.add(task)
                        task.add_done_callback(finished)
                    full = len(claimed) >= self._batch_size
                except Exception:
                    log.exception("webhook dispatch iteration failed; retrying")
                    full = False
                if full:
                    await asyncio.sleep(0)  # let the new requests start, then claim more
                    continue
                await _wait_any(stop, wake, interval)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()

    async def update_backlog(self) -> int:
        """Set the pending-deliveries gauge; return the count."""
        count = int(await self._pool.fetchval(_BACKLOG))
        metrics.WEBHOOK_BACKLOG.set(count)
        return count

    # ------------------------------------------------------------------ claiming
    async def _claim(self) -> list[_Claimed]:
        async with self._claim_lock:
            busy = self.in_flight()
            rows = await self._pool.fetch(
                _CLAIM,
                self._per_endpoint,
                list(busy),
                list(busy.values()),
                self._batch_size,
                self._lease_s,
            )
            claimed = [_claimed(row) for row in rows]
            for item in claimed:
                self._in_flight[item.endpoint_id] = self._in_flight.get(item.endpoint_id, 0) + 1
            return claimed

    def _release(self, endpoint_id: int) -> None:
        left = self._in_flight.get(endpoint_id, 0) - 1
        if left > 0:
            self._in_flight[endpoint_id] = left
        else:
            self._in_flight.pop(endpoint_id, None)

    # ------------------------------------------------------------------ delivering
    async def _deliver(self, item: _Claimed) -> None:
        try:
            result = await self._send(item)
            await self._record(item, result)
        except Exception:
            # Not recorded: the lease runs out and the delivery is attempted again.
            log.exception(
                "webhook delivery %s (attempt %s) could not be recorded",
                item.delivery_id, item.attempt, extra=_log_extra(item),
            )
        finally:
            self._release(item.endpoint_id)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.webhook_timeout_seconds),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def _send(self, item: _Claimed) -> _Result:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(item.payload, item.secrets, timestamp),
            EVENT_ID_HEADER: item.event_id,
            ATTEMPT_HEADER: str(item.attempt),
        }
        attempted_at = datetime.now(UTC)
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            async with self._http().post(
                item.url, data=item.payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                await response.content.read(MAX_RESPONSE_BYTES)  # the answer is not used
        except TimeoutError:
            error = f"timeout after {self._settings.webhook_timeout_seconds:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # an unexpected failure is still an attempt that failed
            log.exception("webhook POST failed unexpectedly", extra=_log_extra(item))
            error = f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - started
        metrics.WEBHOOK_DELIVERY_LATENCY.observe(latency)
        if status is not None and not 200 <= status < 300:
            error = f"HTTP {status}"
        if error is not None:
            error = error.replace(item.url, redact_url(item.url))[:500]
        return _Result(attempted_at, status, error, latency)

    def _next_delay(self, item: _Claimed) -> float | None:
        """Seconds until the next attempt after a failure, or None: schedule exhausted."""
        k = item.attempt - item.schedule_offset
        if 1 <= k <= len(self._schedule):
            return max(0.0, self._schedule[k - 1])
        return None

    async def _record(self, item: _Claimed, result: _Result) -> None:
        attempt_row = (
            item.delivery_id,
            item.attempt,
            result.attempted_at,
            result.status_code,
            result.latency_s * 1000.0,
            result.error,
        )
        if result.ok:
            row = await self._pool.fetchrow(_RECORD_RESULT, *attempt_row, "delivered", 0.0)
            metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
            if row is None:
                _log_superseded(item)
            return
        delay = self._next_delay(item)
        if delay is not None:
            row = await self._pool.fetchrow(_RECORD_RESULT, *attempt_row, "pending", delay)
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            if row is None:
                _log_superseded(item)
                return
            log.info(
                "webhook delivery %s to endpoint %s failed (attempt %s: %s); next in %gs",
                item.delivery_id, item.endpoint_id, item.attempt, result.error, delay,
                extra=_log_extra(item),
            )
            return
        await self._pool.execute(_RECORD_ATTEMPT, *attempt_row)
        await self._mark_dead(item, result)

    async def _mark_dead(self, item: _Claimed, result: _Result) -> None:
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    _MARK_DEAD, item.delivery_id, item.attempt, result.status_code, result.error
                )
                if row is None:
                    _log_superseded(item)
                    return
                if self._on_dead is not None:
                    await self._on_dead(
                        DeadDelivery(
                            delivery_id=item.delivery_id,
                            event_id=item.event_id,
                            endpoint_id=item.endpoint_id,
                            endpoint_url=item.url,
                            payment_id=item.payment_id,
                            merchant_id=item.merchant_id,
                            event_type=item.event_type,
                            payload=item.payload,
                            attempts=item.attempt,
                            last_status_code=result.status_code,
                            last_error=result.error,
                            created_at=row["created_at"],
                            first_attempt_at=row["first_attempt_at"],
                            dead_at=row["dead_at"],
                        )
                    )
        except Exception:
            # The transaction rolled back: still pending, attempted again after the lease.
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            log.exception(
                "webhook delivery %s: retry schedule exhausted but dead-lettering failed; "
                "it stays pending", item.delivery_id, extra=_log_extra(item),
            )
            return
        metrics.WEBHOOK_DELIVERIES.labels("dead").inc()
        log.warning(
            "webhook delivery %s to endpoint %s is dead after %s attempts (last: %s)",
            item.delivery_id, item.endpoint_id, item.attempt, result.error,
            extra=_log_extra(item),
        )


def _claimed(row: Any) -> _Claimed:
    secrets = [row["secret"]]
    if row["previous_secret"]:
        secrets.append(row["previous_secret"])
    return _Claimed(
        delivery_id=row["id"],
        event_id=row["event_id"],
        endpoint_id=row["endpoint_id"],
        url=row["url"],
        secrets=tuple(secrets),
        payment_id=row["payment_id"],
        merchant_id=row["merchant_id"],
        event_type=row["event_type"],
        payload=bytes(row["payload"]),
        attempt=row["attempts"],
        schedule_offset=row["schedule_offset"],
    )


def _log_extra(item: _Claimed) -> dict[str, Any]:
    return {"payment_id": item.payment_id, "merchant_id": item.merchant_id}


def _log_superseded(item: _Claimed) -> None:
    log.info(
        "webhook delivery %s attempt %s outlived its lease; another attempt superseded it",
        item.delivery_id, item.attempt, extra=_log_extra(item),
    )


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Return when ``stop`` or ``wake`` is set, or after ``seconds``."""
    if stop.is_set() or wake.is_set():
        return
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def kafka_dead_letter(
    publisher: EventPublisher, *, consumer_group: str = "paystream-webhooks"
) -> Callable[[DeadDelivery], Awaitable[None]]:
    """An ``on_dead`` that publishes the dead delivery's payload to ``payments.webhooks.dlq``
    (keyed by payment id, ``dlq.*`` headers: stage ``webhook``, reason
    ``retries_exhausted``) and flushes, so it returns only once the broker has it."""

    async def dead_letter(dead: DeadDelivery) -> None:
        detail = (
            f"endpoint {dead.endpoint_id} ({redact_url(dead.endpoint_url)}): delivery "
            f"{dead.delivery_id} of event {dead.event_id} failed {dead.attempts} attempts; "
            f"last: {dead.last_error or dead.last_status_code}"
        )
        envelope = DlqEnvelope(
            stage="webhook",
            reason="retries_exhausted",
            error_type="WebhookDeliveryFailed",
            error_message=detail,
            original_topic=EVENTS,
            original_partition=-1,  # the outbox row, not a Kafka record, is the origin
            original_offset=-1,
            consumer_group=consumer_group,
            attempts=dead.attempts,
            first_failure_at=dead.first_attempt_at or dead.dead_at,
            last_failure_at=dead.dead_at,
        )
        headers = envelope.to_headers() + [
            ("webhook.delivery_id", str(dead.delivery_id).encode()),
            ("webhook.endpoint_id", str(dead.endpoint_id).encode()),
            ("webhook.event_id", dead.event_id.encode()),
        ]
        publisher.publish(
            WEBHOOKS_DLQ, dead.payment_id.encode(), scrub_payload(dead.payload), headers
        )
        await publisher.flush()
        metrics.DLQ_RECORDS.labels("webhook", "retries_exhausted").inc()

    return dead_letter
