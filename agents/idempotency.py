"""Merchant-wide idempotency keys: which payment an idempotency key belongs to.

The full idempotency record (the request's fingerprint and the events it produced) lives
in the payment's state in the ``payment_state`` Faust table, so a repeated command is
answered by the payment's only writer without another Kafka hop. What that table cannot
see is the same key sent for a *different* ``payment_id`` (another partition). This index
binds ``merchant_id + idempotency_key`` to the first ``payment_id`` that used it; a command
whose key is bound to another payment is an idempotency conflict and nothing is charged.

The binding is durable in PostgreSQL (``idempotency_keys``; one statement per batch), so a
Redis flush, eviction or failover cannot let a key charge twice. A key is released
``idempotency_retention_seconds`` (Stripe: at least 24 h) after its payment last used it:
every command of the owning payment refreshes it, and so does every event answering it
(:func:`touch`, in the event sink's transaction), so the retention runs from the last
answer the merchant saw, however long retries and verification took.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

_BIND_SQL = """
WITH req AS (
    SELECT DISTINCT ON (merchant_id, idempotency_key) merchant_id, idempotency_key, payment_id
      FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY
           AS r(merchant_id, idempotency_key, payment_id, ord)
     ORDER BY merchant_id, idempotency_key, ord
), bound AS (
    INSERT INTO idempotency_keys AS k (merchant_id, idempotency_key, payment_id)
    SELECT merchant_id, idempotency_key, payment_id FROM req
    ON CONFLICT (merchant_id, idempotency_key) DO UPDATE
       SET payment_id = EXCLUDED.payment_id, bound_at = now()
     WHERE k.payment_id = EXCLUDED.payment_id
        OR k.bound_at < now() - make_interval(secs => $4::double precision)
    RETURNING k.merchant_id, k.idempotency_key, k.payment_id
)
SELECT r.merchant_id, r.idempotency_key, COALESCE(b.payment_id, k.payment_id) AS owner
  FROM req r
  LEFT JOIN bound b USING (merchant_id, idempotency_key)
  LEFT JOIN idempotency_keys k USING (merchant_id, idempotency_key)
"""

_OWNERS_SQL = """
SELECT merchant_id, idempotency_key, payment_id AS owner FROM idempotency_keys
 WHERE (merchant_id, idempotency_key) IN (
       SELECT * FROM unnest($1::text[], $2::text[]))
"""


_TOUCH_SQL = """
UPDATE idempotency_keys AS k SET bound_at = now()
  FROM unnest($1::text[], $2::text[], $3::text[]) AS e(merchant_id, idempotency_key, payment_id)
 WHERE k.merchant_id = e.merchant_id AND k.idempotency_key = e.idempotency_key
   AND k.payment_id = e.payment_id
"""


async def touch(conn: asyncpg.Connection, answered: Sequence[tuple[str, str, str]]) -> None:
    """Restart the retention of each ``(merchant_id, idempotency_key, payment_id)`` whose
    command was just answered (keys of paystream's own operations are not bound: no-op)."""
    unique = sorted(set(answered))
    if unique:
        await conn.execute(_TOUCH_SQL, [m for m, _k, _p in unique],
                           [k for _m, k, _p in unique], [p for _m, _k, p in unique])


class MerchantIdempotencyKeys:
    """``(merchant_id, idempotency_key) -> payment_id`` in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_seconds: int) -> None:
        self._pool = pool
        self._ttl = ttl_seconds

    async def bind(self, requests: Sequence[tuple[str, str, str]]) -> list[str]:
        """Bind each ``(merchant_id, idempotency_key, payment_id)``; returns the owners
        (the given ``payment_id`` when the key was free or already its own)."""
        if not requests:
            return []
        merchants = [m for m, _k, _p in requests]
        keys = [k for _m, k, _p in requests]
        payments = [p for _m, _k, p in requests]
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_BIND_SQL, merchants, keys, payments, float(self._ttl))
            owners = {(r["merchant_id"], r["idempotency_key"]): r["owner"] for r in rows}
            unknown = [mk for mk, owner in owners.items() if owner is None]
            if unknown:  # bound concurrently by another worker after our snapshot
                again = await conn.fetch(
                    _OWNERS_SQL, [m for m, _k in unknown], [k for _m, k in unknown]
                )
                owners.update({(r["merchant_id"], r["idempotency_key"]): r["owner"]
                               for r in again})
        return [str(owners[(m, k)]) for m, k, _p in requests]
