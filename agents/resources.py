"""The connections the agents share (PostgreSQL, Redis, the PSP router, idempotency keys)."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis

from agents.idempotency import MerchantIdempotencyKeys
from config.settings import Settings
from psp.registry import GuardSettings, build_router
from psp.routing import Router, default_routing_table
from psp.sandbox_adapter import SandboxAdapter
from sinks.migrations import migrate


class Resources:
    """Connections an agent needs, created when the worker starts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self.router: Router | None = None
        self.merchant_keys: MerchantIdempotencyKeys | None = None

    def redis_client(self) -> aioredis.Redis:
        if self.redis is None:
            # Hundreds of payments run concurrently: wait for a free connection rather
            # than fail (the default pool raises MaxConnectionsError when exhausted).
            self.redis = aioredis.Redis(
                connection_pool=aioredis.BlockingConnectionPool.from_url(
                    self.settings.redis_url, max_connections=64, timeout=10
                )
            )
        return self.redis

    async def idempotency_keys(self) -> MerchantIdempotencyKeys:
        if self.merchant_keys is None:
            self.merchant_keys = MerchantIdempotencyKeys(
                self.redis_client(),
                await self.db(),
                key_prefix=self.settings.app_id,
                ttl_seconds=self.settings.idempotency_retention_seconds,
            )
        return self.merchant_keys

    async def db(self) -> asyncpg.Pool:
        if self.pool is None:
            self.pool = await asyncpg.create_pool(self.settings.pg_dsn, min_size=1, max_size=8)
            async with self.pool.acquire() as conn:
                await migrate(conn)
        return self.pool

    def psps(self) -> Router:
        """The PSP router: one adapter per configured PSP, breakers and limits in Redis."""
        if self.router is None:
            s = self.settings
            adapters = [
                SandboxAdapter(
                    name=psp.name,
                    base_url=psp.url,
                    api_key=psp.api_key,
                    timeout=s.psp_timeout_seconds,
                    connection_limit=s.psp_max_in_flight,
                    webhook_secrets=(psp.webhook_secret,),
                )
                for psp in s.psp_endpoints()
            ]
            self.router = build_router(
                self.redis_client(),
                adapters,
                default_routing_table(),
                GuardSettings(
                    failure_threshold=s.psp_breaker_failures,
                    open_seconds=s.psp_breaker_open_seconds,
                    max_in_flight=s.psp_max_in_flight,
                    # A SIGKILLed worker's slots come back when their leases lapse: just
                    # longer than any call can take (the PSP timeout), no more.
                    lease_seconds=2 * s.psp_timeout_seconds + 1,
                    slot_timeout=s.psp_slot_wait_seconds,
                    key_prefix=s.app_id,
                ),
            )
        return self.router

    async def close(self) -> None:
        if self.router is not None:
            await self.router.close()
            self.router = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
            self.merchant_keys = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
