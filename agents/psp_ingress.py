"""PSP webhook ingress: verify, deduplicate and publish PSP webhooks to ``psp.notifications``.

``POST /psp/{name}/webhooks`` is served by the worker's web server, which hands the raw
body and the ``Stripe-Signature`` header to :meth:`PspWebhookIngress.handle`. That method
is framework-free (no Faust, no aiohttp), so it can be tested and reused on its own.

What a request gets, in order of the checks:

* ``404`` for a PSP name we have no adapter for (counted ``("unknown", "unknown_psp")``:
  the name comes from the URL, so it never becomes a label value).
* ``400`` when the signature header is missing or malformed, no ``v1`` signature matches
  the raw body under the PSP's webhook secret, or the signed timestamp is further than
  ``settings.psp_webhook_tolerance_seconds`` from now in either direction (stale replays
  and far-future timestamps alike); counted ``bad_signature``. A correctly signed body
  that cannot be normalised (not JSON, no event id, ...) is also ``400``, counted
  ``bad_request``. Nothing is published for any of them.
* ``200 {"duplicate": true}`` for an event id this ingress already accepted (Redis key
  ``{app_id}:psp-webhook:{psp}:{event_id}``, kept ``psp_webhook_dedupe_seconds``); not
  published again.
* otherwise the normalised :class:`~psp.protocol.PspNotification` (JSON) is published to
  ``psp.notifications`` keyed by our ``payment_id`` when the PSP echoed it, else by
  ``"{psp}:{psp_reference}"``, and the answer waits for the broker's acknowledgement:
  ``200`` once acknowledged, ``503`` when the broker refused or did not acknowledge in
  time (counted ``error``), so the PSP retries. A Redis failure before publishing is also
  ``503``.

Deduplication is best effort, by design: the event id is remembered only AFTER the broker
acknowledged the write, so a failed publish never swallows the PSP's retry. Two copies of
one event arriving concurrently (or a retry racing a slow acknowledgement) can therefore
both be published. That is safe: the notification agent applies notifications to the
payment's state machine, where a repeated notification is a no-op (terminal states never
regress, and a state already reached is not reached again).

Publishing uses group commit: concurrent requests' records are produced together and
covered by one ``flush``; every request of the group is answered by that flush's outcome
(all ``200`` or all ``503``). The :class:`~topics.publisher.EventPublisher` must therefore be
dedicated to this ingress: its ``flush`` reports every queued record's failures, so a
publisher shared with an agent could hand the agent's failure to a webhook or the reverse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.settings import Settings
from observability import metrics
from psp.protocol import PspAdapter, PspNotification
from schemas.signatures import SignatureError, verify_signature
from topics.catalog import PSP_NOTIFICATIONS
from topics.publisher import EventPublisher

__all__ = ["DEFAULT_FLUSH_TIMEOUT_SECONDS", "UNKNOWN_PSP_LABEL", "PspWebhookIngress"]

log = logging.getLogger(__name__)

DEFAULT_FLUSH_TIMEOUT_SECONDS = 10.0
"""How long a request waits for the broker's acknowledgement before answering 503
(below the webhook timeouts PSPs use, so the PSP sees our answer rather than its timeout)."""

UNKNOWN_PSP_LABEL = "unknown"
"""``psp`` label of requests for PSP names we do not know (keeps the label set bounded)."""

Response = tuple[int, dict[str, Any]]


class PspWebhookIngress:
    """Turns signed PSP webhook requests into records on ``psp.notifications``.

    ``adapters`` maps a PSP name (the ``{name}`` of the route) to its adapter, whose
    ``parse_webhook`` normalises the event. The signature is checked here first with the
    PSP's secret from ``settings.psp_endpoints()`` and the configured tolerance
    (``parse_webhook`` has no tolerance parameter), then again by ``parse_webhook`` with
    the adapter's own secrets. ``publisher`` must be used by this ingress only (see the
    module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        adapters: Mapping[str, PspAdapter],
        redis: aioredis.Redis,
        publisher: EventPublisher,
        *,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_SECONDS,
    ) -> None:
        self._settings = settings
        self._adapters = dict(adapters)
        self._secrets: dict[str, str] = {
            endpoint.name: endpoint.webhook_secret for endpoint in settings.psp_endpoints()
        }
        self._redis = redis
        self._publisher = publisher
        self._flush_timeout = flush_timeout
        self._tolerance = settings.psp_webhook_tolerance_seconds
        self._dedupe_seconds = settings.psp_webhook_dedupe_seconds
        self._pending: list[tuple[bytes, bytes, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def dedupe_key(self, psp_name: str, event_id: str) -> str:
        """The Redis key remembering an accepted event id."""
        return f"{self._settings.app_id}:psp-webhook:{psp_name}:{event_id}"

    @staticmethod
    def record_key(notification: PspNotification) -> bytes:
        """The Kafka key: our payment id when the PSP echoed it, else ``psp:reference``."""
        if notification.payment_id:
            return notification.payment_id.encode("utf-8")
        reference = notification.psp_reference or notification.event_id
        return f"{notification.psp}:{reference}".encode()

    async def handle(
        self, psp_name: str, body: bytes, signature_header: str | None
    ) -> Response:
        """Answer one webhook request: (HTTP status, JSON body). Never raises for bad input
        or an unavailable broker / Redis (those are 4xx / 503 answers)."""
        adapter = self._adapters.get(psp_name)
        if adapter is None:
            metrics.PSP_WEBHOOKS.labels(UNKNOWN_PSP_LABEL, "unknown_psp").inc()
            return 404, {"error": "unknown_psp", "message": "no such PSP"}
        secret = self._secrets.get(psp_name)
        if not secret:
            log.error("PSP webhook for %s: no webhook secret configured", psp_name)
            metrics.PSP_WEBHOOKS.labels(psp_name, "error").inc()
            return 500, {"error": "not_configured", "message": "no webhook secret for this PSP"}
        if not signature_header:
            return self._bad_signature(psp_name, "missing Stripe-Signature header")
        try:
            verify_signature(body, signature_header, secret, tolerance=self._tolerance)
        except SignatureError as exc:
            return self._bad_signature(psp_name, str(exc))
        try:
            notification = adapter.parse_webhook(body, signature_header)
        except SignatureError as exc:
            return self._bad_signature(psp_name, str(exc))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # The message may quote the body: log and answer the error's type only.
            log.warning("PSP webhook from %s: malformed body (%s)", psp_name, type(exc).__name__)
            metrics.PSP_WEBHOOKS.labels(psp_name, "bad_request").inc()
            return 400, {"error": "bad_request", "message": "malformed webhook event"}
        if not notification.event_id:
            metrics.PSP_WEBHOOKS.labels(psp_name, "bad_request").inc()
            return 400, {"error": "bad_request", "message": "webhook event without an id"}

        event_id = notification.event_id
        dedupe_key = self.dedupe_key(psp_name, event_id)
        try:
            seen = await self._redis.exists(dedupe_key)
        except (RedisError, OSError) as exc:
            log.warning("PSP webhook %s/%s: Redis unavailable (%r)", psp_name, event_id, exc)
            metrics.PSP_WEBHOOKS.labels(psp_name, "error").inc()
            return 503, {"error": "unavailable", "message": "try again later"}
        if seen:
            metrics.PSP_WEBHOOKS.labels(psp_name, "duplicate").inc()
            return 200, {"received": True, "duplicate": True, "event_id": event_id}

        try:
            value = notification.model_dump_json().encode()
            await self._write(self.record_key(notification), value)
        except Exception as exc:  # noqa: BLE001 - any publish failure: 503, the PSP retries
            log.warning(
                "PSP webhook %s/%s: not acknowledged by the broker (%r)",
                psp_name,
                event_id,
                exc,
                extra={"payment_id": notification.payment_id},
            )
            metrics.PSP_WEBHOOKS.labels(psp_name, "error").inc()
            return 503, {"error": "unavailable", "message": "try again later"}

        try:
            await self._redis.set(dedupe_key, b"1", ex=self._dedupe_seconds)
        except (RedisError, OSError) as exc:
            # The record is durable; forgetting the id only lets a later copy through,
            # which the notification agent treats as a no-op.
            log.warning("PSP webhook %s/%s: event id not remembered (%r)", psp_name, event_id,
                        exc)
        metrics.PSP_WEBHOOKS.labels(psp_name, "accepted").inc()
        return 200, {"received": True, "duplicate": False, "event_id": event_id}

    def _bad_signature(self, psp_name: str, reason: str) -> Response:
        log.warning("PSP webhook from %s rejected: %s", psp_name, reason)
        metrics.PSP_WEBHOOKS.labels(psp_name, "bad_signature").inc()
        return 400, {"error": "bad_signature", "message": reason}

    # ------------------------------------------------------------------ group commit
    async def _write(self, key: bytes, value: bytes) -> None:
        """Publish one record; return once the broker acknowledged it (raise otherwise)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, value, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_pending())
        # shield: a request cancelled (client gone) must not cancel the shared future.
        await asyncio.shield(done)

    async def _flush_pending(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            error: BaseException | None = None
            try:
                for key, value, _ in group:
                    self._publisher.publish(PSP_NOTIFICATIONS, key, value)
                await self._publisher.flush(self._flush_timeout)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                error = exc
            for _, _, done in group:
                if done.done():
                    continue
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    async def close(self) -> None:
        """Wait for records still being written (call before closing the publisher)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
