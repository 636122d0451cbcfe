"""Merchant-wide idempotency keys: which payment an idempotency key belongs to.

The full idempotency record (the request's fingerprint and the events it produced) lives
in the payment's state in the ``payment_state`` Faust table, so a repeated command is
answered by the payment's only writer without another Kafka hop. What that table cannot
see is the same key sent for a *different* ``payment_id`` (another partition). This index
binds ``merchant_id + idempotency_key`` to the first ``payment_id`` that used it, for
``idempotency_retention_seconds`` (Stripe keeps keys for at least 24 h); a command whose key
is bound to another payment is an idempotency conflict and nothing is charged.

One Redis round trip per batch: a pipeline of one small Lua script per command.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

_BIND = """
local owner = redis.call('GET', KEYS[1])
if owner then return owner end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""


class MerchantIdempotencyKeys:
    """Redis index ``(merchant_id, idempotency_key) -> payment_id``."""

    def __init__(self, redis: aioredis.Redis, *, key_prefix: str, ttl_seconds: int) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._script = redis.register_script(_BIND)

    def _key(self, merchant_id: str, idempotency_key: str) -> str:
        return f"{self._prefix}:idem:{merchant_id}:{idempotency_key}"

    async def bind(self, requests: Sequence[tuple[str, str, str]]) -> list[str]:
        """Bind each ``(merchant_id, idempotency_key, payment_id)``; returns the owners
        (the given ``payment_id`` when the key was free or already its own)."""
        if not requests:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for merchant_id, key, payment_id in requests:
                await self._script(
                    keys=[self._key(merchant_id, key)], args=[payment_id, self._ttl], client=pipe
                )
            results = await pipe.execute()
        return [r.decode() if isinstance(r, bytes) else str(r) for r in results]
