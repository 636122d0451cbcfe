"""The connections the agents share (PostgreSQL, Redis, the PSP router, idempotency keys)."""

from __future__ import annotations

import asyncio

import asyncpg
import redis.asyncio as aioredis

from agents.idempotency import MerchantIdempotencyKeys
from config.settings import Settings
from psp.claims import PgAttemptClaims
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
        self._pool_lock = asyncio.Lock()

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
                await self.db(), ttl_seconds=self.settings.idempotency_retention_seconds
            )
        return self.merchant_keys

    async def db(self) -> asyncpg.Pool:
        """The pool, created once (many payments may ask for it at the same moment)."""
        if self.pool is None:
            async with self._pool_lock:
                if self.pool is None:
                    pool = await asyncpg.create_pool(
                        self.settings.pg_dsn, min_size=1, max_size=16
                    )
                    async with pool.acquire() as conn:
                        await migrate(conn)
                    self.pool = pool
        return self.pool

    def psps(self) -> Router:
        """The PSP router: one adapter per configured PSP, breakers and limits in Redis,
        attempt claims in PostgreSQL (they must survive a Redis flush)."""
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
                claims=PgAttemptClaims(self.db),
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
