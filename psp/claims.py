"""Attempt claims: which PSP an attempt id was sent to, recorded before it is sent.

A PSP's idempotency key only protects against a second charge *at that PSP*. If a worker
sends attempt ``A`` to alpha and crashes before recording it, the redelivered command
would route ``A`` afresh, and with alpha's breaker now open, fail it over to beta: a
second charge. So the router claims ``A`` for a PSP (Redis ``SET NX``) right before the
call: a claim held by another PSP means ``A`` may already have been charged there, and
``A`` is only ever re-sent to that owner (where its idempotency key replays the first
answer). A claim is released only when the call certainly did not reach the PSP
(``not_sent``), so failover after a refused connection still works.
"""

from __future__ import annotations

import redis.asyncio as aioredis

DEFAULT_TTL_SECONDS = 7 * 24 * 3600

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
