"""Routing rules (pure), and the Router's failover against two real sandbox PSPs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_exceptions

from psp.limits import RedisConcurrencyLimit
from psp.protocol import AuthorizeRequest, CaptureRequest, PspResult
from psp.registry import GuardSettings, build_router
from psp.routing import (
    NO_ROUTE_CODE,
    MerchantPolicy,
    PspCapability,
    Router,
    RoutingTable,
    UnknownPspError,
    default_routing_table,
    is_rate_limited,
    plan_route,
    route,
)
from tests.psp.psp_harness import Sandbox
from tests.psp.routing_harness import (
    FakeClock,
    adapter_for,
    new_prefix,
    redis_clients,
    running_sandbox,
    set_faults,
)

# --- routing rules -----------------------------------------------------------------------


def test_currency_support_and_kwd_only_at_beta() -> None:
    table = default_routing_table()
    assert route(5_000, "KWD", "m_1", table) == ["beta"]
    decision = plan_route(5_000, "KWD", "m_1", table)
    assert decision.rejected == {"alpha": "currency KWD not supported"}
    assert route(1_000, "CHF", "m_1", table) == []
    reason = plan_route(1_000, "CHF", "m_1", table).reason
    assert "no PSP supports this payment" in reason and "currency CHF not supported" in reason


def test_cost_ordering_with_fallback_order_on_ties() -> None:
    table = default_routing_table()
    # USD 10.00: alpha 29 + 30 = 59 < beta 25 + 40 = 65
    assert route(1_000, "USD", "m_1", table) == ["alpha", "beta"]
    # USD 100.00: alpha 290 + 30 = 320 > beta 250 + 40 = 290
    assert route(10_000, "USD", "m_1", table) == ["beta", "alpha"]
    # USD 25.00: alpha 72.5 -> 73 + 30 = 103, beta 62.5 -> 63 + 40 = 103: a tie
    assert table.fee("alpha", 2_500, "USD") == table.fee("beta", 2_500, "USD") == 103
    assert route(2_500, "USD", "m_1", table) == ["alpha", "beta"]
    flipped = replace(table, fallback_order=("beta", "alpha"))
    assert route(2_500, "USD", "m_1", flipped) == ["beta", "alpha"]


def test_max_amount_per_currency() -> None:
    base = default_routing_table()
    alpha = replace(base.psps["alpha"], max_amount={"USD": 50_000})
    table = replace(base, psps={"alpha": alpha, "beta": base.psps["beta"]})
    assert route(50_000, "USD", "m_1", table) == ["beta", "alpha"]
    assert route(50_001, "USD", "m_1", table) == ["beta"]
    assert plan_route(50_001, "USD", "m_1", table).rejected == {
        "alpha": "amount 50001 above maximum 50000 USD"
    }


def test_merchant_preference_and_exclusivity() -> None:
    base = default_routing_table()
    table = replace(
        base,
        merchants={
            "m_beta_first": MerchantPolicy(preferred=("beta",)),
            "m_alpha_only": MerchantPolicy(preferred=("alpha",), exclusive=True),
        },
    )
    assert route(1_000, "USD", "m_beta_first", table) == ["beta", "alpha"]  # despite cost
    assert route(1_000, "USD", "m_alpha_only", table) == ["alpha"]
    assert route(5_000, "KWD", "m_alpha_only", table) == []  # preference cannot add currency
    assert route(1_000, "USD", "m_other", table) == ["alpha", "beta"]


def test_operations_and_table_validation() -> None:
    base = default_routing_table()
    alpha = replace(base.psps["alpha"], operations=frozenset({"authorize", "refund"}))
    table = replace(base, psps={"alpha": alpha, "beta": base.psps["beta"]})
    assert plan_route(1_000, "USD", "m", table).candidates == ("alpha", "beta")
    manual = plan_route(1_000, "USD", "m", table, operations=("authorize", "capture"))
    assert manual.candidates == ("beta",)
    with pytest.raises(ValueError, match="unknown PSPs"):
        RoutingTable(psps=dict(base.psps), fallback_order=("alpha", "gamma"))
    with pytest.raises(ValueError, match="listed under the name"):
        RoutingTable(psps={"x": base.psps["alpha"]}, fallback_order=())
    jpy = PspCapability("j", frozenset({"JPY"}), 360, 30, fee_fixed_by_currency={"JPY": 0})
    assert jpy.fee(1_000, "JPY") == 36


def test_rate_limited_means_refused_before_processing() -> None:
    assert is_rate_limited(
        PspResult(outcome="retryable_error", psp="a", decline_code="rate_limit", retry_after=1.0)
    )
    assert not is_rate_limited(
        PspResult(outcome="retryable_error", psp="a", decline_code="api_error")
    )
    processed = PspResult(
        outcome="retryable_error", psp="a", decline_code="rate_limit", psp_reference="pi_1"
    )
    assert not is_rate_limited(processed)


# --- the Router against real sandboxes -------------------------------------------------


@dataclass
class Psps:
    alpha: Sandbox
    beta: Sandbox


@pytest.fixture
async def psps() -> AsyncIterator[Psps]:
    async with running_sandbox("alpha") as alpha, running_sandbox("beta") as beta:
        yield Psps(alpha, beta)


_counter = 0


def request(
    *, amount: int = 1_000, currency: str = "USD", method: str = "tok_visa", manual: bool = False
) -> AuthorizeRequest:
    global _counter
    _counter += 1
    return AuthorizeRequest(
        attempt_id=f"att_{new_prefix()}_{_counter}",
        payment_id=f"pay_{_counter}",
        merchant_id="m_1",
        amount=amount,
        currency=currency,
        payment_method=method,
        capture_method="manual" if manual else "automatic",
    )


def make_router(
    alpha_url: str,
    beta_url: str,
    *,
    timeout: float = 2.0,
    limits: dict[str, RedisConcurrencyLimit] | None = None,
) -> Router:
    adapters = [
        adapter_for("alpha", alpha_url, timeout=timeout),
        adapter_for("beta", beta_url, timeout=timeout),
    ]
    return Router(adapters, default_routing_table(), limits=limits)


async def test_connection_refused_fails_over_to_beta(psps: Psps, unused_port: int) -> None:
    router = make_router(f"http://127.0.0.1:{unused_port}", psps.beta.base_url)
    try:
        req = request(manual=True)
        result = await router.authorize(req)
        assert (result.outcome, result.psp, result.status) == (
            "succeeded",
            "beta",
            "requires_capture",
        )
        charges = await psps.beta.charges()
        assert [c["idempotency_key"] for c in charges] == [req.attempt_id]  # same attempt id
        # Capture goes to the PSP holding the payment, with no routing.
        assert result.psp_reference is not None
        captured = await router.adapter(result.psp).capture(
            CaptureRequest(
                attempt_id=req.attempt_id + "_cap",
                payment_id=req.payment_id,
                psp_reference=result.psp_reference,
                amount=1_000,
            )
        )
        assert (captured.outcome, captured.psp, captured.status) == (
            "succeeded",
            "beta",
            "succeeded",
        )
        with pytest.raises(UnknownPspError):
            router.adapter("gamma")
    finally:
        await router.close()


async def test_unknown_outcome_never_fails_over(psps: Psps) -> None:
    await set_faults(psps.alpha, timeout_rate=1.0)
    router = make_router(psps.alpha.base_url, psps.beta.base_url, timeout=0.3)
    try:
        req = request()
        result = await router.authorize(req)
        assert (result.outcome, result.psp) == ("unknown", "alpha")
        assert await psps.beta.charges() == []
        # Alpha did charge (the timeout hit after processing): failing over would double-charge.
        assert [c["idempotency_key"] for c in await psps.alpha.charges()] == [req.attempt_id]
    finally:
        await router.close()


async def test_5xx_and_declines_do_not_fail_over_but_429_does(psps: Psps) -> None:
    router = make_router(psps.alpha.base_url, psps.beta.base_url)
    try:
        declined = await router.authorize(request(method="tok_chargeDeclined"))
        assert (declined.outcome, declined.psp) == ("declined", "alpha")
        await set_faults(psps.alpha, error_rate=1.0)
        five_xx = await router.authorize(request())
        assert (five_xx.outcome, five_xx.psp) == ("retryable_error", "alpha")
        assert await psps.beta.charges() == []
        await set_faults(psps.alpha, error_rate=0.0, rate_limit_rate=1.0)
        req = request()
        result = await router.authorize(req)
        assert (result.outcome, result.psp) == ("succeeded", "beta")
        assert [c["idempotency_key"] for c in await psps.beta.charges()] == [req.attempt_id]
        # Pinned retry (for an attempt alpha may have seen): no failover.
        pinned = await router.authorize(request(), psp="alpha")
        assert (pinned.outcome, pinned.psp) == ("retryable_error", "alpha")
        assert len(await psps.beta.charges()) == 1
    finally:
        await router.close()


async def test_no_route_and_kwd_goes_to_beta(psps: Psps) -> None:
    router = make_router(psps.alpha.base_url, psps.beta.base_url)
    try:
        none = await router.authorize(request(currency="CHF"))
        assert (none.outcome, none.decline_code, none.psp) == ("declined", NO_ROUTE_CODE, "")
        assert none.message is not None and "CHF" in none.message
        kwd = await router.authorize(request(amount=5_000, currency="KWD"))
        assert (kwd.outcome, kwd.psp) == ("succeeded", "beta")
        assert await psps.alpha.charges() == []
    finally:
        await router.close()


async def test_all_candidates_unavailable(unused_port: int) -> None:
    url = f"http://127.0.0.1:{unused_port}"
    router = make_router(url, url)
    try:
        result = await router.authorize(request())
        assert (result.outcome, result.psp) == ("not_sent", "beta")
        assert result.message is not None and result.message.startswith("no PSP took")
    finally:
        await router.close()


@pytest.fixture
async def redis_env() -> AsyncIterator[tuple[str, list[aioredis.Redis]]]:
    prefix = new_prefix()
    async with redis_clients(prefix, 1) as clients:
        yield prefix, clients


async def test_no_concurrency_slot_fails_over(
    psps: Psps, redis_env: tuple[str, list[aioredis.Redis]]
) -> None:
    prefix, (client,) = redis_env
    clock = FakeClock()
    limit = RedisConcurrencyLimit(client, "alpha", limit=1, key_prefix=prefix, clock=clock)
    router = make_router(psps.alpha.base_url, psps.beta.base_url, limits={"alpha": limit})
    try:
        busy = await limit.try_acquire()  # another worker's call in flight
        assert busy is not None
        result = await router.authorize(request())
        assert (result.outcome, result.psp) == ("succeeded", "beta")
        await limit.release(busy)
        result = await router.authorize(request())
        assert (result.outcome, result.psp) == ("succeeded", "alpha")
        assert await limit.in_use() == 0  # the router gave its slot back
    finally:
        await router.close()


async def test_build_router_guards_every_psp(
    psps: Psps, redis_env: tuple[str, list[aioredis.Redis]]
) -> None:
    prefix, (client,) = redis_env
    adapters = [adapter_for("alpha", psps.alpha.base_url), adapter_for("beta", psps.beta.base_url)]
    router = build_router(
        client,
        adapters,
        guards=GuardSettings(failure_threshold=1, key_prefix=prefix),
        clock=FakeClock(),
    )
    try:
        await set_faults(psps.alpha, error_rate=1.0)
        first = await router.authorize(request())
        assert (first.outcome, first.psp) == ("retryable_error", "alpha")
        breaker = router.breaker("alpha")
        assert breaker is not None and await breaker.state() == "open"
        second = await router.authorize(request())
        assert (second.outcome, second.psp) == ("succeeded", "beta")
    finally:
        await router.close()


class _RedisGoneAfterAcquire(RedisConcurrencyLimit):
    """A real limit whose Redis connection is lost while the PSP call is in flight."""

    async def release(self, lease: Any) -> None:
        raise redis_exceptions.ConnectionError("Connection reset by peer (simulated)")


async def test_redis_error_after_the_psp_call_keeps_the_psp_answer(
    psps: Psps, redis_env: tuple[str, list[aioredis.Redis]]
) -> None:
    """Finding 4 of issue 11: a Redis error after the call must not lose a charge."""
    prefix, (client,) = redis_env
    limit = _RedisGoneAfterAcquire(client, "alpha", limit=5, key_prefix=prefix,
                                   clock=FakeClock())
    router = make_router(psps.alpha.base_url, psps.beta.base_url, limits={"alpha": limit})
    try:
        req = request()
        result = await router.authorize(req)
        assert (result.outcome, result.psp, result.status) == ("succeeded", "alpha", "succeeded")
        assert [c["idempotency_key"] for c in await psps.alpha.charges()] == [req.attempt_id]
    finally:
        await router.close()


async def test_redis_down_before_the_call_sends_nothing(psps: Psps, unused_port: int) -> None:
    """Guards that cannot be asked (Redis down) mean not sent: no PSP sees the request."""
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{unused_port}/0")
    adapters = [adapter_for("alpha", psps.alpha.base_url), adapter_for("beta", psps.beta.base_url)]
    router = build_router(dead, adapters, guards=GuardSettings(key_prefix=new_prefix()),
                          clock=FakeClock())
    try:
        result = await router.authorize(request())
        assert result.outcome == "not_sent", result
        assert await psps.alpha.charges() == [] and await psps.beta.charges() == []
    finally:
        await router.close()
        await dead.aclose()
