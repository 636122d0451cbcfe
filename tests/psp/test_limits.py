"""The Redis-shared per-PSP concurrency limit, against a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from psp.limits import NoSlotError, RedisConcurrencyLimit
from tests.psp.routing_harness import FakeClock, new_prefix, redis_clients


@pytest.fixture
async def env() -> AsyncIterator[tuple[str, list[aioredis.Redis], FakeClock]]:
    prefix = new_prefix()
    async with redis_clients(prefix, 2) as clients:
        yield prefix, clients, FakeClock()


def _limit(
    client: aioredis.Redis, prefix: str, clock: FakeClock, limit: int = 3
) -> RedisConcurrencyLimit:
    return RedisConcurrencyLimit(
        client, "alpha", limit=limit, lease_seconds=10.0, key_prefix=prefix, clock=clock
    )


async def test_limit_is_shared_and_the_extra_acquire_fails(
    env: tuple[str, list[aioredis.Redis], FakeClock],
) -> None:
    prefix, (r1, r2), clock = env
    worker1, worker2 = _limit(r1, prefix, clock), _limit(r2, prefix, clock)
    leases = [await worker1.try_acquire(), await worker2.try_acquire(), await worker1.acquire()]
    assert all(lease is not None for lease in leases)
    assert await worker2.in_use() == 3
    assert await worker2.try_acquire() is None  # the N+1th, from the other worker
    assert await worker1.acquire(wait=0.05) is None  # waited, still none
    first = leases[0]
    assert first is not None
    assert await worker2.release(first) is True
    assert await worker2.try_acquire() is not None


async def test_waiter_gets_the_released_slot(
    env: tuple[str, list[aioredis.Redis], FakeClock],
) -> None:
    prefix, (r1, r2), clock = env
    worker1, worker2 = _limit(r1, prefix, clock, limit=1), _limit(r2, prefix, clock, limit=1)
    held = await worker1.try_acquire()
    assert held is not None
    waiter = asyncio.create_task(worker2.acquire(wait=5.0))
    await asyncio.sleep(0)  # let the waiter make its first (failing) attempt
    assert not waiter.done()
    await worker1.release(held)
    got = await asyncio.wait_for(waiter, 5.0)
    assert got is not None and got.token != held.token


async def test_expired_leases_of_a_crashed_worker_come_back(
    env: tuple[str, list[aioredis.Redis], FakeClock],
) -> None:
    prefix, (r1, r2), clock = env
    crashed, survivor = _limit(r1, prefix, clock), _limit(r2, prefix, clock)
    stale = [await crashed.try_acquire() for _ in range(3)]
    assert await survivor.try_acquire() is None
    clock.advance(9.9)
    assert await survivor.try_acquire() is None  # leases still alive
    clock.advance(0.2)  # past lease_seconds
    assert await survivor.in_use() == 0
    fresh = [await survivor.try_acquire() for _ in range(3)]
    assert all(lease is not None for lease in fresh)
    assert await survivor.try_acquire() is None
    lease = stale[0]
    assert lease is not None
    assert await crashed.release(lease) is False  # already expired: frees nothing
    assert await survivor.in_use() == 3


async def test_extend_keeps_a_long_call_slot(
    env: tuple[str, list[aioredis.Redis], FakeClock],
) -> None:
    prefix, (r1, _), clock = env
    limit = _limit(r1, prefix, clock, limit=1)
    lease = await limit.try_acquire()
    assert lease is not None
    clock.advance(8.0)
    renewed = await limit.extend(lease)
    assert renewed is not None and renewed.expires_at == clock.now + 10.0
    clock.advance(8.0)  # 16 s after acquiring: alive thanks to the renewal
    assert await limit.try_acquire() is None
    clock.advance(3.0)
    assert await limit.extend(renewed) is None  # expired
    assert await limit.try_acquire() is not None


async def test_concurrent_acquires_never_exceed_the_limit(
    env: tuple[str, list[aioredis.Redis], FakeClock],
) -> None:
    prefix, (r1, r2), clock = env
    limits = [_limit(r1 if i % 2 else r2, prefix, clock, limit=5) for i in range(20)]
    results = await asyncio.gather(*(limit.try_acquire() for limit in limits))
    assert sum(lease is not None for lease in results) == 5


async def test_slot_context_manager(env: tuple[str, list[aioredis.Redis], FakeClock]) -> None:
    prefix, (r1, _), clock = env
    limit = _limit(r1, prefix, clock, limit=1)
    async with limit.slot() as lease:
        assert lease.psp == "alpha"
        assert await limit.in_use() == 1
        with pytest.raises(NoSlotError):
            async with limit.slot(wait=0.0):
                pass
    assert await limit.in_use() == 0
