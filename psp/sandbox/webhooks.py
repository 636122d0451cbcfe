"""Delivery of the sandbox's webhook events: signed POSTs with retries, duplicates, reordering.

The :class:`WebhookDispatcher` is the running app's :class:`~psp.sandbox.state.EventSink`.
For each event the state emits, when a URL is configured (``state.webhook.url``):

- it schedules one delivery, or two (same event id, same body) with probability
  ``duplicate_rate``;
- after ``delay_ms``, the delivery goes to the send queue, or with ``reorder`` on to a
  buffer of ``reorder_window`` deliveries that is shuffled when full (or after
  ``reorder_flush_ms`` without new events) before being queued;
- one sender task POSTs them in queue order, each attempt signed afresh
  (``Stripe-Signature: t=<now>,v1=...`` with the webhook secret, over the unchanged body);
- a non-2xx answer or a connection error is retried after ``retry_backoff_ms``, doubled
  per attempt, up to ``max_attempts`` attempts (a retry goes to the back of the queue).

Each attempt is recorded on the event (``attempts``, ``delivered``, ``last_status``,
``last_error``): ``GET /sandbox/webhooks``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiohttp

from psp.sandbox.state import SandboxState, WebhookEvent
from schemas.signatures import PSP_SIGNATURE_HEADER as SIGNATURE_HEADER
from schemas.signatures import sign_payload

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 5.0
USER_AGENT = "paystream-sandbox-webhooks/1.0 (Stripe-compatible)"


@dataclass(frozen=True)
class _Delivery:
    event: WebhookEvent
    url: str
    attempt: int = 0
    """Attempts already made for this copy."""


class WebhookDispatcher:
    """Delivers one sandbox's events; :meth:`start` and :meth:`stop` on the app's loop."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._buffer: list[_Delivery] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self._session: aiohttp.ClientSession | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
            headers={"User-Agent": USER_AGENT},
        )
        self._sender = asyncio.create_task(self._send_loop(), name="sandbox-webhooks")
        self._state.sink = self

    async def stop(self) -> None:
        if self._state.sink is self:
            self._state.sink = None
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._session is not None:
            await self._session.close()

    # --- EventSink ------------------------------------------------------------------------

    def publish(self, event: WebhookEvent) -> None:
        cfg = self._state.webhook
        if cfg.url is None:
            return
        event.url = cfg.url
        copies = 1
        if cfg.duplicate_rate > 0 and self._state.rng.random() < cfg.duplicate_rate:
            copies = 2
        event.copies += copies
        for _ in range(copies):
            delivery = _Delivery(event, cfg.url)
            if cfg.delay_ms > 0:
                self.later(cfg.delay_ms / 1000.0, partial(self._route, delivery))
            else:
                self._route(delivery)

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._timers.discard(handle)
            action()

        handle = loop.call_later(max(0.0, delay_s), fire)
        self._timers.add(handle)

    # --- routing ----------------------------------------------------------------------------

    def _route(self, delivery: _Delivery) -> None:
        cfg = self._state.webhook
        if not cfg.reorder:
            self._queue.put_nowait(delivery)
            return
        self._buffer.append(delivery)
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if len(self._buffer) >= max(1, cfg.reorder_window):
            self._flush()
        else:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(cfg.reorder_flush_ms / 1000.0, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        batch, self._buffer = self._buffer, []
        self._state.rng.shuffle(batch)
        for delivery in batch:
            self._queue.put_nowait(delivery)

    # --- sending ----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            delivery = await self._queue.get()
            event = delivery.event
            if self._state.events.get(event.id) is not event:
                continue  # the sandbox was reset since
            status, error = await self._post(delivery)
            event.attempts += 1
            event.last_status = status
            event.last_error = error
            if status is not None and 200 <= status < 300:
                event.delivered += 1
                continue
            cfg = self._state.webhook
            if delivery.attempt + 1 >= cfg.max_attempts:
                log.warning(
                    "webhook %s (%s) to %s given up after %d attempts: %s",
                    event.id,
                    event.type,
                    delivery.url,
                    delivery.attempt + 1,
                    error or status,
                )
                continue
            backoff_s = cfg.retry_backoff_ms * (2**delivery.attempt) / 1000.0
            retry = _Delivery(event, delivery.url, delivery.attempt + 1)
            self.later(backoff_s, partial(self._queue.put_nowait, retry))

    async def _post(self, delivery: _Delivery) -> tuple[int | None, str | None]:
        assert self._session is not None  # noqa: S101 - started before any event
        event = delivery.event
        signature = sign_payload(event.body, self._state.webhook_secret, int(time.time()))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: signature}
        try:
            async with self._session.post(delivery.url, data=event.body, headers=headers) as resp:
                await resp.read()
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                return resp.status, error
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
