"""Attempt claims: an attempt sent to one PSP is never failed over to another.

The double charge this prevents: attempt A goes to alpha (charged, response lost), the
worker crashes before recording it, and the redelivered command finds alpha unreachable
or its breaker open; without a claim the router would send A to beta and charge again.
"""

from __future__ import annotations

from psp.claims import AttemptClaims
from psp.routing import Router, default_routing_table
from tests.psp.routing_harness import adapter_for, new_prefix, redis_clients
from tests.psp.test_routing import Psps, psps, request  # noqa: F401 - psps is a fixture


def router_with_claims(alpha_url: str, beta_url: str, claims: AttemptClaims) -> Router:
    adapters = [adapter_for("alpha", alpha_url), adapter_for("beta", beta_url)]
    return Router(adapters, default_routing_table(), claims=claims)


async def test_an_attempt_seen_by_alpha_is_never_sent_to_beta(
    psps: Psps, unused_port: int  # noqa: F811
) -> None:
    prefix = new_prefix()
    async with redis_clients(prefix, 1) as [redis]:
        claims = AttemptClaims(redis, key_prefix=prefix)
        req = request()
        first = router_with_claims(psps.alpha.base_url, psps.beta.base_url, claims)
        try:
            charged = await first.authorize(req)
        finally:
            await first.close()
        assert (charged.outcome, charged.psp) == ("succeeded", "alpha")
        assert await claims.owner(req.attempt_id) == "alpha"

        # "After the crash": alpha cannot be reached at all.
        again = router_with_claims(f"http://127.0.0.1:{unused_port}", psps.beta.base_url, claims)
        try:
            result = await again.authorize(req)
        finally:
            await again.close()
    assert result.outcome == "unknown"  # may have charged at alpha: verify, never fail over
    assert result.psp == "alpha"
    assert await psps.beta.charges() == []
    assert len(await psps.alpha.charges()) == 1


async def test_a_claim_is_released_when_the_request_certainly_never_arrived(
    psps: Psps, unused_port: int  # noqa: F811
) -> None:
    prefix = new_prefix()
    async with redis_clients(prefix, 1) as [redis]:
        claims = AttemptClaims(redis, key_prefix=prefix)
        req = request()
        router = router_with_claims(f"http://127.0.0.1:{unused_port}", psps.beta.base_url, claims)
        try:
            result = await router.authorize(req)
        finally:
            await router.close()
        assert (result.outcome, result.psp) == ("succeeded", "beta")
        assert await claims.owner(req.attempt_id) == "beta"
    assert len(await psps.beta.charges()) == 1


async def test_a_replay_at_the_owner_returns_the_first_answer(psps: Psps) -> None:  # noqa: F811
    prefix = new_prefix()
    async with redis_clients(prefix, 1) as [redis]:
        claims = AttemptClaims(redis, key_prefix=prefix)
        req = request()
        router = router_with_claims(psps.alpha.base_url, psps.beta.base_url, claims)
        try:
            first = await router.authorize(req)
            second = await router.authorize(req)
        finally:
            await router.close()
    assert second.psp_reference == first.psp_reference
    assert len(await psps.alpha.charges()) == 1


async def test_claims_in_postgresql_survive_a_redis_flush(pg_dsn: str) -> None:
    """The pipeline keeps claims in PostgreSQL: a Redis FLUSHDB together with a lost
    payment state must not let a re-run send the attempt to a second PSP (found by the
    fault simulation: charged at alpha and at beta)."""
    import uuid

    import asyncpg

    from psp.claims import PgAttemptClaims
    from sinks.migrations import migrate

    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        await migrate(pool)

        async def get_pool() -> asyncpg.Pool:
            return pool

        claims = PgAttemptClaims(get_pool)
        attempt = f"att_pg_{uuid.uuid4().hex[:8]}_authorize_1"
        assert await claims.owner(attempt) is None
        assert await claims.claim(attempt, "alpha") == "alpha"
        assert await claims.claim(attempt, "beta") == "alpha"  # a re-run after a crash
        assert await PgAttemptClaims(get_pool).owner(attempt) == "alpha"  # another worker
        await claims.release(attempt, "beta")  # not the owner: nothing happens
        assert await claims.owner(attempt) == "alpha"
        await claims.release(attempt, "alpha")  # certainly not received: free again
        assert await claims.claim(attempt, "beta") == "beta"
    finally:
        await pool.close()
