"""Attempt claims: which PSP an attempt id was sent to, recorded before it is sent.

A PSP's idempotency key only protects against a second charge *at that PSP*. If a worker
sends attempt ``A`` to alpha and crashes before recording it, the redelivered command
would route ``A`` afresh, and with alpha's breaker now open, fail it over to beta: a
second charge. So the router claims ``A`` for a PSP (Redis ``SET NX``) right before the
call: a claim held by another PSP means ``A`` may already have been charged there, and
``A`` is only ever re-sent to that owner (where its idempotency key replays the first
answer). A claim is released only when the call certainly did not reach the PSP
(``not_sent``, or refused with a 429), so failover after a refused connection still works.

Claims are money-critical state: losing them (a Redis FLUSHDB, an eviction, a failover to
a replica that missed the write) while a payment's state is lost too (a SIGKILL) lets the
re-run send the attempt to a second PSP. So the pipeline keeps them in PostgreSQL
(:class:`PgAttemptClaims`, table ``attempt_claims``); :class:`AttemptClaims` in Redis stays
for tests and tools that have no database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import asyncpg
import redis.asyncio as aioredis

DEFAULT_TTL_SECONDS = 7 * 24 * 3600

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Claims(Protocol):
    """Which PSP an attempt id was first sent to."""

    async def claim(self, attempt_id: str, psp: str) -> str: ...

    async def owner(self, attempt_id: str) -> str | None: ...

    async def release(self, attempt_id: str, psp: str) -> None: ...


class AttemptClaims:
    """Redis-backed record of attempt id -> the PSP it was first sent to."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str = "paystream",
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._release = redis.register_script(_RELEASE)

    def _key(self, attempt_id: str) -> str:
        return f"{self._prefix}:attempt:{attempt_id}"

    async def claim(self, attempt_id: str, psp: str) -> str:
        """Claim ``attempt_id`` for ``psp``; returns the owner (``psp``, or an earlier one)."""
        key = self._key(attempt_id)
        if await self._redis.set(key, psp, nx=True, ex=self._ttl):
            return psp
        owner = await self._redis.get(key)
        if owner is None:  # expired between the two calls: claim again
            return await self.claim(attempt_id, psp)
        return owner.decode() if isinstance(owner, bytes) else str(owner)

    async def owner(self, attempt_id: str) -> str | None:
        value = await self._redis.get(self._key(attempt_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def release(self, attempt_id: str, psp: str) -> None:
        """Drop ``psp``'s claim (only when the request certainly never reached it)."""
        await self._release(keys=[self._key(attempt_id)], args=[psp])


_PG_CLAIM = """
WITH claimed AS (
    INSERT INTO attempt_claims (attempt_id, psp) VALUES ($1, $2)
    ON CONFLICT (attempt_id) DO NOTHING
    RETURNING psp
)
SELECT psp FROM claimed
UNION ALL
SELECT psp FROM attempt_claims WHERE attempt_id = $1
LIMIT 1
"""


class PgAttemptClaims:
    """Attempt claims in PostgreSQL (``attempt_claims``, created by the migrations): they
    survive a Redis flush. ``pool`` is a coroutine function giving the pool (created on
    first use, after the migrations ran)."""

    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool = pool

    async def claim(self, attempt_id: str, psp: str) -> str:
        pool = await self._pool()
        for _ in range(3):
            async with pool.acquire() as conn:
                owner = await conn.fetchval(_PG_CLAIM, attempt_id, psp)
            if owner is not None:
                return str(owner)
            # Claimed concurrently by another worker after our snapshot: read it again.
        raise RuntimeError(f"attempt claim of {attempt_id} could not be read")

    async def owner(self, attempt_id: str) -> str | None:
        pool = await self._pool()
        async with pool.acquire() as conn:
            owner = await conn.fetchval(
                "SELECT psp FROM attempt_claims WHERE attempt_id = $1", attempt_id
            )
        return None if owner is None else str(owner)

    async def release(self, attempt_id: str, psp: str) -> None:
        pool = await self._pool()
        async with pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM attempt_claims WHERE attempt_id = $1 AND psp = $2", attempt_id, psp
            )
