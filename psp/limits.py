"""A per-PSP concurrency limit shared by every worker through Redis.

A distributed counting semaphore with leases: the slots in use are a sorted set of
``lease token -> expiry time``. Acquiring runs one Lua script that first drops expired
leases (so the slots of a crashed worker come back after ``lease_seconds``), then adds a
lease if fewer than ``limit`` are held. Releasing removes the token; releasing a lease that
already expired is harmless (returns ``False``).

Redis layout: ``{prefix}:limit:{psp}`` (zset). The key itself expires once no lease can be
alive, so idle PSPs leave nothing behind.

Time for lease expiry comes from the injectable ``clock`` (default :func:`time.time`, shared
by workers up to clock skew); waiting for a free slot uses the event loop's clock.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis

_ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  local ttl = tonumber(ARGV[5])
  if redis.call('PTTL', KEYS[1]) < ttl then
    redis.call('PEXPIRE', KEYS[1], ttl)
  end
  return 1
end
return 0
"""

_EXTEND_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[3]) == false then
  return 0
end
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[3])) <= tonumber(ARGV[1]) then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
local ttl = tonumber(ARGV[4])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""


class NoSlotError(Exception):
    """No concurrency slot became free within the timeout."""


@dataclass(frozen=True, slots=True)
class Lease:
    """One held slot; give it back with :meth:`RedisConcurrencyLimit.release`."""

    psp: str
    token: str
    expires_at: float


class RedisConcurrencyLimit:
    """At most ``limit`` calls in flight to one PSP, across all workers."""

    def __init__(
        self,
        redis: aioredis.Redis,
        psp: str,
        *,
        limit: int,
        lease_seconds: float = 30.0,
        key_prefix: str = "paystream",
        clock: Callable[[], float] = time.time,
        poll_interval: float = 0.01,
        max_poll_interval: float = 0.1,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if lease_seconds <= 0 or poll_interval <= 0 or max_poll_interval < poll_interval:
            raise ValueError("lease_seconds and poll intervals must be positive")
        self._redis = redis
        self.psp = psp
        self.limit = limit
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._poll = poll_interval
        self._max_poll = max_poll_interval
        self._key = f"{key_prefix}:limit:{{{psp}}}"
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._extend = redis.register_script(_EXTEND_LUA)

    @property
    def key(self) -> str:
        """The Redis key holding the leases."""
        return self._key

    def _key_ttl_ms(self) -> int:
        # Real milliseconds the key must outlive its newest lease (plus a margin).
        return math.ceil(self.lease_seconds * 1000) + 1000

    async def try_acquire(self) -> Lease | None:
        """A slot now, or ``None`` when all ``limit`` slots are held."""
        now = self._clock()
        token = secrets.token_hex(12)
        expires_at = now + self.lease_seconds
        got = await self._acquire(
            keys=[self._key],
            args=[repr(now), self.limit, repr(expires_at), token, self._key_ttl_ms()],
        )
        return Lease(self.psp, token, expires_at) if int(got) else None

    async def acquire(self, wait: float = 0.0) -> Lease | None:
        """A slot, waiting up to ``wait`` seconds (polling Redis); ``None`` if none freed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        delay = self._poll
        while True:
            lease = await self.try_acquire()
            if lease is not None:
                return lease
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, self._max_poll)

    async def release(self, lease: Lease) -> bool:
        """Give the slot back; ``False`` if the lease had already expired and been dropped."""
        removed = await self._redis.zrem(self._key, lease.token)
        return bool(removed)

    async def extend(self, lease: Lease) -> Lease | None:
        """Renew a lease for another ``lease_seconds`` (long calls); ``None`` if it expired."""
        now = self._clock()
        expires_at = now + self.lease_seconds
        ok = await self._extend(
            keys=[self._key],
            args=[repr(now), repr(expires_at), lease.token, self._key_ttl_ms()],
        )
        return Lease(self.psp, lease.token, expires_at) if int(ok) else None

    async def in_use(self) -> int:
        """Slots held by unexpired leases."""
        return int(await self._redis.zcount(self._key, f"({self._clock()!r}", "+inf"))

    @asynccontextmanager
    async def slot(self, wait: float = 0.0) -> AsyncIterator[Lease]:
        """``async with limit.slot(wait) as lease:`` holds a slot for the block.

        Raises :class:`NoSlotError` when none is free within ``wait`` seconds."""
        lease = await self.acquire(wait)
        if lease is None:
            raise NoSlotError(f"no concurrency slot for PSP {self.psp} within {wait}s")
        try:
            yield lease
        finally:
            await self.release(lease)
