"""The Redis-shared circuit breaker: unit behaviour against real Redis, then end to end with
two real sandbox PSPs, observed from two independent breaker instances (two "workers")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from psp.breaker import BreakerState, RedisCircuitBreaker, is_failure, result_is_failure
from psp.protocol import AuthorizeRequest, PspResult
from psp.routing import Router, default_routing_table
from tests.psp.routing_harness import (
    FakeClock,
    adapter_for,
    new_prefix,
    redis_clients,
    running_sandbox,
    set_faults,
)


@dataclass
class Env:
    prefix: str
    clients: list[aioredis.Redis]
    clock: FakeClock

    def breaker(
        self,
        worker: int = 0,
        psp: str = "alpha",
        *,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        trial_timeout_seconds: float = 30.0,
    ) -> RedisCircuitBreaker:
        return RedisCircuitBreaker(
            self.clients[worker],
            psp,
            failure_threshold=3,
            open_seconds=5.0,
            half_open_max_calls=half_open_max_calls,
            success_threshold=success_threshold,
            trial_timeout_seconds=trial_timeout_seconds,
            key_prefix=self.prefix,
            clock=self.clock,
        )


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    prefix = new_prefix()
    async with redis_clients(prefix, 2) as clients:
        yield Env(prefix, clients, FakeClock())


async def states(*breakers: RedisCircuitBreaker) -> list[BreakerState]:
    return [await b.state() for b in breakers]


async def trip(breaker: RedisCircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        await breaker.record("unknown")
    assert await breaker.state() == "open"


def test_outcome_classification() -> None:
    for outcome in ("not_sent", "retryable_error", "unknown"):
        assert is_failure(outcome)
    for outcome in ("succeeded", "declined", "requires_action"):
        assert not is_failure(outcome)
    with pytest.raises(ValueError, match="not a PSP outcome"):
        is_failure("timeout")
    processed = PspResult(
        outcome="retryable_error",
        psp="alpha",
        psp_reference="pi_1",
        decline_code="processing_error",
    )
    five_xx = PspResult(outcome="retryable_error", psp="alpha", decline_code="api_error")
    assert not result_is_failure(processed)
    assert result_is_failure(five_xx)


async def test_opens_after_consecutive_failures_seen_by_both_workers(env: Env) -> None:
    w1, w2 = env.breaker(0), env.breaker(1)
    assert await states(w1, w2) == ["closed", "closed"]
    await w1.record("unknown")
    await w2.record("retryable_error")
    await w1.record("declined")  # a healthy answer resets the run
    assert await w2.failures() == 0
    await w1.record("not_sent")
    await w2.record("retryable_error")
    assert await states(w1, w2) == ["closed", "closed"]
    assert await w1.record("unknown") == "open"
    assert await states(w1, w2) == ["open", "open"]
    assert not await w1.allow()
    assert not await w2.allow()
    await w2.record("succeeded")  # a late result of a call made before it opened: ignored
    assert await states(w1, w2) == ["open", "open"]


async def test_half_open_single_trial_slot_across_workers(env: Env) -> None:
    breakers = [env.breaker(i % 2) for i in range(10)]
    old_permit = await breakers[0].try_acquire()  # a call started while closed
    assert old_permit is not None and old_permit.trial is None
    await trip(breakers[0])
    env.clock.advance(4.99)
    assert await breakers[1].state() == "open"
    assert not await breakers[1].allow()
    env.clock.advance(0.02)
    assert await states(breakers[0], breakers[1]) == ["half_open", "half_open"]
    permits = await asyncio.gather(*(b.try_acquire() for b in breakers))
    granted = [(b, p) for b, p in zip(breakers, permits, strict=True) if p is not None]
    assert len(granted) == 1
    winner, permit = granted[0]
    assert permit.trial is not None
    # The old call's result is not the trial's: it does not close the breaker.
    assert await breakers[5].record("succeeded", old_permit) == "half_open"
    assert not await breakers[5].allow()  # the single slot is still taken
    assert await winner.record("succeeded", permit) == "closed"
    assert await states(breakers[0], breakers[1]) == ["closed", "closed"]
    assert await breakers[7].allow()


async def test_trial_failure_reopens_for_a_new_cool_down(env: Env) -> None:
    w1, w2 = env.breaker(0), env.breaker(1)
    await trip(w1)
    env.clock.advance(5.0)
    permit = await w2.try_acquire()
    assert permit is not None
    assert await w2.record("unknown", permit) == "open"
    assert await states(w1, w2) == ["open", "open"]
    env.clock.advance(4.0)  # cool-down restarts at the trial failure
    assert not await w1.allow()
    env.clock.advance(1.0)
    assert await w1.allow()  # bool API: holds the trial slot
    assert await w1.state() == "half_open"
    assert not await w2.allow()
    assert await w1.record("declined") == "closed"  # bool API counts the oldest trial


async def test_success_threshold_and_parallel_trials(env: Env) -> None:
    w1 = env.breaker(0, half_open_max_calls=2, success_threshold=2)
    w2 = env.breaker(1, half_open_max_calls=2, success_threshold=2)
    await trip(w1)
    env.clock.advance(5.0)
    p1, p2 = await w1.try_acquire(), await w2.try_acquire()
    assert p1 is not None and p2 is not None
    assert await w1.try_acquire() is None  # both trial slots taken
    assert await w1.record("succeeded", p1) == "half_open"
    assert await w2.record("requires_action", p2) == "closed"


async def test_unreported_trial_slot_expires_and_unused_permit_is_released(env: Env) -> None:
    w1 = env.breaker(0, trial_timeout_seconds=10.0)
    w2 = env.breaker(1, trial_timeout_seconds=10.0)
    await trip(w1)
    env.clock.advance(5.0)
    assert await w1.try_acquire() is not None  # this worker then crashes mid-call
    assert await w2.try_acquire() is None
    env.clock.advance(10.01)
    permit = await w2.try_acquire()
    assert permit is not None
    await w2.release(permit)  # the call was never made (e.g. no concurrency slot)
    again = await w1.try_acquire()
    assert again is not None
    await w1.reset()
    assert await states(w1, w2) == ["closed", "closed"]


async def test_breaker_moves_traffic_to_beta_and_back(env: Env) -> None:
    async with running_sandbox("alpha") as alpha, running_sandbox("beta") as beta:
        a1, a2 = env.breaker(0, "alpha"), env.breaker(1, "alpha")  # worker 1, worker 2
        router = Router(
            [adapter_for("alpha", alpha.base_url), adapter_for("beta", beta.base_url)],
            default_routing_table(),
            breakers={"alpha": a1, "beta": env.breaker(0, "beta")},
        )
        n = 0

        async def pay() -> PspResult:
            nonlocal n
            n += 1
            req = AuthorizeRequest(
                attempt_id=f"att_{env.prefix}_{n}",
                payment_id=f"pay_{n}",
                merchant_id="m_1",
                amount=1000,  # USD 10.00: alpha is cheaper, so first
                currency="USD",
                payment_method="tok_visa",
                capture_method="automatic",
            )
            return await router.authorize(req)

        try:
            await set_faults(alpha, error_rate=1.0)
            for i in range(3):  # 5xx may have been processed: no failover, counted as failures
                result = await pay()
                assert (result.outcome, result.psp) == ("retryable_error", "alpha")
                expected = "open" if i == 2 else "closed"
                assert await states(a1, a2) == [expected, expected]
            result = await pay()  # breaker open: alpha skipped, beta charges
            assert (result.outcome, result.psp) == ("succeeded", "beta")
            assert await alpha.charges() == []
            assert [c["idempotency_key"] for c in await beta.charges()] == [f"att_{env.prefix}_4"]

            await set_faults(alpha, error_rate=0.0)
            env.clock.advance(5.0)
            assert await states(a1, a2) == ["half_open", "half_open"]
            held = await a2.try_acquire()  # worker 2 takes the single trial slot
            assert held is not None
            result = await pay()  # worker 1 may not also try alpha: beta
            assert (result.outcome, result.psp) == ("succeeded", "beta")
            await a2.release(held)  # worker 2 did not make its call after all
            result = await pay()  # worker 1's trial at alpha succeeds: closed
            assert (result.outcome, result.psp) == ("succeeded", "alpha")
            assert await states(a1, a2) == ["closed", "closed"]
            assert len(await alpha.charges()) == 1
            assert len(await beta.charges()) == 2
        finally:
            await router.close()
