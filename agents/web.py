"""The worker's web views (port ``PAYSTREAM_WEB_PORT``).

``GET /v1/payments/{id}`` (the status read model in PostgreSQL), ``POST
/psp/{name}/webhooks`` (PSP webhooks in, agents/psp_ingress.py), ``/metrics``,
``/healthz`` and ``/readyz``. Faust registers a page when it is decorated, so the view
classes are defined in :meth:`WebViews.register`, called from ``create_app``.
"""

from __future__ import annotations

from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.context import AgentContext
from agents.psp_ingress import PspWebhookIngress
from schemas.signatures import PSP_SIGNATURE_HEADER as SIGNATURE_HEADER
from sinks import status
from topics.publisher import EventPublisher


class WebViews:
    """The pages of one worker and what they share (the PSP webhook ingress)."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.ingress_parts: list[PspWebhookIngress] = []
        self.views: list[type[faust.web.View]] = []

    def psp_ingress(self) -> PspWebhookIngress:
        if not self.ingress_parts:
            settings, resources = self.ctx.settings, self.ctx.resources
            adapters = {endpoint.name: resources.psps().adapter(endpoint.name)
                        for endpoint in settings.psp_endpoints()}
            self.ingress_parts.append(PspWebhookIngress(
                settings, adapters, resources.redis_client(), EventPublisher(settings)
            ))
        return self.ingress_parts[0]

    def register(self) -> None:
        app, resources, parts = self.ctx.app, self.ctx.resources, self

        @app.page("/v1/payments/{payment_id}")
        class PaymentStatusView(faust.web.View):
            async def get(self, request: Any, payment_id: str) -> Any:
                pool = await resources.db()
                async with pool.acquire() as conn:
                    found = await status.get_status(conn, payment_id)
                if found is None:
                    return self.json({"error": "not_found", "payment_id": payment_id},
                                     status=404)
                return self.json(found)

        @app.page("/psp/{name}/webhooks")
        class PspWebhookView(faust.web.View):
            """PSP webhooks in: verified, deduplicated, on psp.notifications before the 2xx."""

            async def post(self, request: Any, name: str) -> Any:
                body = await request.read()
                code, answer = await parts.psp_ingress().handle(
                    name, body, request.headers.get(SIGNATURE_HEADER)
                )
                return self.json(answer, status=code)

        @app.page("/metrics")
        class MetricsView(faust.web.View):
            async def get(self, request: Any) -> Any:
                # aiohttp refuses a charset inside content_type; the exposition format is
                # UTF-8.
                content_type = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"
                return self.bytes(generate_latest(), content_type=content_type)

        @app.page("/healthz")
        class HealthView(faust.web.View):
            async def get(self, request: Any) -> Any:
                return self.json({"status": "ok"})

        @app.page("/readyz")
        class ReadyView(faust.web.View):
            async def get(self, request: Any) -> Any:
                try:
                    pool = await resources.db()
                    async with pool.acquire() as conn:
                        await conn.fetchval("SELECT 1")
                except Exception as exc:  # noqa: BLE001 - readiness reports any failure
                    return self.json({"status": "not_ready", "error": str(exc)}, status=503)
                if not app.rebalancing and app.consumer is not None:
                    return self.json({"status": "ready"})
                return self.json({"status": "not_ready", "error": "rebalancing"}, status=503)

        self.views.extend([PaymentStatusView, PspWebhookView, MetricsView, HealthView,
                           ReadyView])
