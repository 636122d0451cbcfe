"""The worker's timers: the expiry sweep, the stuck-payment sweep and the gauges.

Every worker runs them over the payment states it holds (the ``payment_state`` table); the
payment's writer re-checks whatever a sweep asks for, so a request from a standby or a
second worker is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from agents.context import AgentContext
from agents.monitors import BreakerStateMonitor, LagMonitor, LedgerImbalanceMonitor
from agents.runtime import with_infra_retries
from agents.state import PaymentState
from observability import metrics
from schemas.internal import ExpireAuthorization
from topics import catalog as cat
from topics.publisher import EventPublisher

log = logging.getLogger("paystream.agents")

RequestVerification = Callable[..., None]
"""``CommandAgent.request_verification(publisher, state, *, sweep=...)``."""


class Timers:
    """``sweep_expired_authorizations``, ``sweep_stuck_payments`` and ``export_gauges``."""

    def __init__(self, ctx: AgentContext, request_verification: RequestVerification) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.request_verification = request_verification
        self.sweep_publishers: list[EventPublisher] = []
        self.monitors: list[Any] = []
        self._timers: list[Any] = []

    def register(self) -> None:
        app, settings = self.ctx.app, self.settings

        @app.timer(settings.expiry_sweep_interval_seconds)  # type: ignore[untyped-decorator]
        async def sweep_expired_authorizations() -> None:
            await self.sweep_expired_authorizations()

        @app.timer(settings.stuck_sweep_interval_seconds)  # type: ignore[untyped-decorator]
        async def sweep_stuck_payments() -> None:
            await self.sweep_stuck_payments()

        @app.timer(settings.lag_poll_interval_seconds)  # type: ignore[untyped-decorator]
        async def export_gauges() -> None:
            await self.export_gauges()

        self._timers.extend([sweep_expired_authorizations, sweep_stuck_payments, export_gauges])

    async def sweep_expired_authorizations(self) -> None:
        """Ask the payment's writer to void authorizations older than their validity.

        Every worker scans the states it holds; the writer re-checks, so a standby's or a
        second worker's request is a no-op.
        """
        settings, state_table = self.settings, self.ctx.state_table
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.authorization_validity_seconds)
        requests: list[tuple[bytes, ExpireAuthorization]] = []
        for key, raw in list(state_table.data.items()):
            if b'"status":"authorized"' not in raw:
                continue
            try:
                state = PaymentState.model_validate_json(raw)
            except Exception:  # noqa: BLE001, S112 - unreadable states are parked elsewhere
                continue
            if state.authorized_at is None or state.authorized_at > cutoff:
                continue
            requests.append((key, ExpireAuthorization(payment_id=state.payment_id,
                                                      requested_at=datetime.now(UTC))))
        if requests:
            log.info("expiry sweep: %d authorizations past their validity", len(requests))
            publisher = self.sweep_publisher()
            for key, request in requests:
                publisher.publish(cat.INTERNAL, key, request.model_dump_json().encode())
            await with_infra_retries("requesting expiries", publisher.flush)

    async def sweep_stuck_payments(self) -> None:
        """Re-verify payments pending verification for longer than ``stuck_after_seconds``.

        Whatever lost a payment's verification (a resolver that gave up while the PSP was
        down, a resolution dead-lettered across a rebalance, a crash between steps), the
        payment's state still says it is pending: one lookup per sweep asks the PSP again
        until it answers. Every worker sweeps the states it holds; duplicates are harmless
        (a resolution applies once, to the attempt it names).
        """
        settings, state_table = self.settings, self.ctx.state_table
        cutoff = datetime.now(UTC) - timedelta(seconds=settings.stuck_after_seconds)
        stuck: list[PaymentState] = []
        for raw in list(state_table.data.values()):
            if b'"pending":null' in raw:  # nothing being verified
                continue
            try:
                state = PaymentState.model_validate_json(raw)
            except Exception:  # noqa: BLE001, S112 - unreadable states are parked elsewhere
                continue
            if state.pending is not None and (
                state.pending.since is None or state.pending.since < cutoff
            ):
                stuck.append(state)
        metrics.STUCK_PAYMENTS.set(len(stuck))
        if not stuck:
            return
        log.warning("stuck-payment sweep: %d payments pending verification for over %.0fs; "
                    "asking the PSPs again", len(stuck), settings.stuck_after_seconds)
        publisher = self.sweep_publisher()
        for state in stuck:
            self.request_verification(publisher, state, sweep=True)
        await with_infra_retries("requesting verification of stuck payments", publisher.flush)

    def sweep_publisher(self) -> EventPublisher:
        """One publisher for both sweeps, created when a sweep first has something to send."""
        if not self.sweep_publishers:
            self.sweep_publishers.append(EventPublisher(self.settings))
        return self.sweep_publishers[0]

    async def export_gauges(self) -> None:
        """Gauges for /metrics: pending verification, lag, breakers, ledger imbalance."""
        settings, resources, monitors = self.settings, self.ctx.resources, self.monitors
        metrics.PENDING_VERIFICATION.set(
            sum(1 for raw in list(self.ctx.state_table.data.values())
                if b'"pending":null' not in raw)
        )
        if not monitors:
            monitors.extend([
                LagMonitor(settings),
                BreakerStateMonitor(
                    resources.redis_client(), [p.name for p in settings.psp_endpoints()],
                    settings.app_id, open_seconds=settings.psp_breaker_open_seconds,
                ),
                LedgerImbalanceMonitor(await resources.db()),
            ])
        for monitor in monitors:
            try:
                await monitor.poll_once()
            except Exception as exc:  # noqa: BLE001 - a gauge must not stop the worker
                log.warning("%s failed: %s: %s", type(monitor).__name__,
                            type(exc).__name__, exc)
