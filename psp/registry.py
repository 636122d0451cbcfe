"""Assemble a :class:`~psp.routing.Router` with a Redis breaker and limit for every PSP."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from psp.breaker import RedisCircuitBreaker
from psp.claims import AttemptClaims, Claims
from psp.limits import RedisConcurrencyLimit
from psp.protocol import PspAdapter
from psp.routing import Router, RoutingTable, default_routing_table


@dataclass(frozen=True)
class GuardSettings:
    """Breaker and concurrency-limit settings applied to every PSP."""

    failure_threshold: int = 5
    open_seconds: float = 5.0
    half_open_max_calls: int = 1
    success_threshold: int = 1
    max_in_flight: int = 256
    """Calls in flight to one PSP across all workers."""
    lease_seconds: float = 30.0
    """Lease of a concurrency slot: longer than the PSP timeout, so a live call keeps it."""
    slot_timeout: float = 0.05
    key_prefix: str = "paystream"


def build_router(
    redis: aioredis.Redis,
    adapters: Sequence[PspAdapter],
    table: RoutingTable | None = None,
    guards: GuardSettings | None = None,
    *,
    clock: Callable[[], float] = time.time,
    claims: Claims | None = None,
) -> Router:
    """A router over ``adapters`` whose breakers and limits live in ``redis``; attempt
    claims in ``claims`` (the pipeline passes PostgreSQL's), else in ``redis``."""
    g = guards or GuardSettings()
    breakers = {
        a.name: RedisCircuitBreaker(
            redis,
            a.name,
            failure_threshold=g.failure_threshold,
            open_seconds=g.open_seconds,
            half_open_max_calls=g.half_open_max_calls,
            success_threshold=g.success_threshold,
            key_prefix=g.key_prefix,
            clock=clock,
        )
        for a in adapters
    }
    limits = {
        a.name: RedisConcurrencyLimit(
            redis,
            a.name,
            limit=g.max_in_flight,
            lease_seconds=g.lease_seconds,
            key_prefix=g.key_prefix,
            clock=clock,
        )
        for a in adapters
    }
    return Router(
        adapters,
        table or default_routing_table(),
        breakers=breakers,
        limits=limits,
        claims=claims if claims is not None else AttemptClaims(redis, key_prefix=g.key_prefix),
        slot_timeout=g.slot_timeout,
    )
