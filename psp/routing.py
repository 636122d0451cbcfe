"""PSP routing: which PSPs may take a payment, in which order, and failover between them.

:func:`route` ranks the PSPs of a :class:`RoutingTable` for one payment:

1. *eligibility*: the PSP supports the currency, the amount is within its maximum for
   that currency, it supports every operation needed (``authorize``; plus ``capture`` for
   a manual-capture payment), and the merchant's policy does not exclude it;
2. *merchant preference*: the merchant's preferred PSPs first, in the merchant's order;
3. *cost*: the rest by fee for this amount (:func:`schemas.money.fee_for`), cheapest first;
4. *fallback order*: ties (and PSPs of equal fee) in the table's fallback order.

:class:`Router` calls the candidates in that order. It fails over to the next candidate
only when the request certainly did not reach the PSP, or was refused before processing:

* ``not_sent`` from the adapter (connection refused, no pooled connection, credentials
  rejected), the PSP's breaker is open, or no concurrency slot was free;
* a 429 (rate limited before processing; ``failover_on_rate_limit``).

It never fails over after ``unknown`` (the PSP may have charged), a 5xx ``retryable_error``
(may have been processed), ``declined``, ``requires_action`` or ``succeeded``.

Attempt ids: a failover reuses the *same* attempt id at the next PSP. Each PSP keeps its own
idempotency-key namespace, and failover only happens when the previous PSP certainly did
not process the request, so the same key can create at most one charge per PSP and at most
one charge in total. ``PspResult.psp`` says which PSP answered; the caller must remember it
and send every later call for that attempt (retries, retrieve) and for the payment
(capture, void, refund) to that PSP: ``router.authorize(req, psp=...)`` (pinned, no
failover) and ``router.adapter(name)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from psp.breaker import BreakerPermit, RedisCircuitBreaker
from psp.claims import Claims
from psp.limits import Lease, RedisConcurrencyLimit
from psp.protocol import AuthorizeRequest, PspAdapter, PspResult
from schemas.money import fee_for

Operation = Literal["authorize", "capture", "void", "refund"]
ALL_OPERATIONS: Final[frozenset[Operation]] = frozenset({"authorize", "capture", "void", "refund"})

log = logging.getLogger("paystream.psp.routing")

NO_ROUTE_CODE: Final = "no_eligible_psp"
"""``decline_code`` of :meth:`Router.authorize` when no PSP can take the payment."""


@dataclass(frozen=True)
class PspCapability:
    """What one PSP supports and what it costs.

    ``max_amount`` maps a currency to the largest amount (minor units) the PSP accepts;
    currencies missing from it have no limit beyond the protocol's. Fees are
    ``fee_bps`` basis points of the amount plus a fixed part in minor units of the
    payment's currency (``fee_fixed``, or ``fee_fixed_by_currency[currency]`` if given).
    """

    name: str
    currencies: frozenset[str]
    fee_bps: int
    fee_fixed: int
    max_amount: Mapping[str, int] = field(default_factory=dict)
    operations: frozenset[Operation] = ALL_OPERATIONS
    fee_fixed_by_currency: Mapping[str, int] = field(default_factory=dict)

    def fee(self, amount: int, currency: str) -> int:
        """This PSP's fee for ``amount`` minor units of ``currency`` (integers only)."""
        fixed = self.fee_fixed_by_currency.get(currency, self.fee_fixed)
        return fee_for(amount, self.fee_bps, fixed)

    def ineligibility(
        self, amount: int, currency: str, operations: Iterable[Operation]
    ) -> str | None:
        """Why this PSP cannot take the payment, or ``None`` if it can."""
        if currency not in self.currencies:
            return f"currency {currency} not supported"
        ceiling = self.max_amount.get(currency)
        if ceiling is not None and amount > ceiling:
            return f"amount {amount} above maximum {ceiling} {currency}"
        missing = sorted(set(operations) - self.operations)
        if missing:
            return f"operations not supported: {', '.join(missing)}"
        return None


@dataclass(frozen=True)
class MerchantPolicy:
    """A merchant's routing preference: ``preferred`` PSPs go first, in this order.
    ``exclusive`` restricts the merchant to those PSPs."""

    preferred: tuple[str, ...] = ()
    exclusive: bool = False


@dataclass(frozen=True)
class RoutingTable:
    """Capabilities of every PSP, merchant preferences and the fallback order."""

    psps: Mapping[str, PspCapability]
    fallback_order: tuple[str, ...]
    merchants: Mapping[str, MerchantPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, cap in self.psps.items():
            if key != cap.name:
                raise ValueError(f"PSP {cap.name!r} listed under the name {key!r}")
        unknown = [name for name in self.fallback_order if name not in self.psps]
        for policy in self.merchants.values():
            unknown += [name for name in policy.preferred if name not in self.psps]
        if unknown:
            raise ValueError(f"unknown PSPs in routing table: {sorted(set(unknown))}")

    def fee(self, psp: str, amount: int, currency: str) -> int:
        """The fee ``psp`` charges for this amount."""
        return self.psps[psp].fee(amount, currency)


@dataclass(frozen=True)
class RouteDecision:
    """Ordered eligible candidates, and why each other PSP was left out."""

    candidates: tuple[str, ...]
    rejected: Mapping[str, str]

    @property
    def reason(self) -> str:
        """A readable explanation (for an empty candidate list)."""
        if self.candidates:
            return f"candidates: {', '.join(self.candidates)}"
        if not self.rejected:
            return "no PSP configured"
        detail = "; ".join(f"{psp}: {why}" for psp, why in sorted(self.rejected.items()))
        return f"no PSP supports this payment ({detail})"


def plan_route(
    amount: int,
    currency: str,
    merchant_id: str,
    table: RoutingTable,
    *,
    operations: Iterable[Operation] = ("authorize",),
) -> RouteDecision:
    """Rank the PSPs of ``table`` for one payment (see the module docstring)."""
    needed = tuple(operations)
    policy = table.merchants.get(merchant_id, MerchantPolicy())
    rejected: dict[str, str] = {}
    eligible: list[str] = []
    for name, cap in table.psps.items():
        why = cap.ineligibility(amount, currency, needed)
        if why is None and policy.exclusive and name not in policy.preferred:
            why = f"merchant {merchant_id} routes only to {', '.join(policy.preferred)}"
        if why is None:
            eligible.append(name)
        else:
            rejected[name] = why
    preferred = [name for name in policy.preferred if name in eligible]
    fallback_rank = {name: i for i, name in enumerate(table.fallback_order)}
    rest = sorted(
        (name for name in eligible if name not in preferred),
        key=lambda name: (
            table.fee(name, amount, currency),
            fallback_rank.get(name, len(fallback_rank)),
            name,
        ),
    )
    return RouteDecision(tuple(preferred + rest), rejected)


def route(amount: int, currency: str, merchant_id: str, table: RoutingTable) -> list[str]:
    """The ordered candidate PSPs for an authorization (empty: none can take it; see
    :func:`plan_route` for the reason)."""
    return list(plan_route(amount, currency, merchant_id, table).candidates)


def default_routing_table() -> RoutingTable:
    """The two sandbox PSPs: ``alpha`` and ``beta`` (KWD only at beta), alpha first."""
    return RoutingTable(
        psps={
            "alpha": PspCapability(
                name="alpha",
                currencies=frozenset({"USD", "EUR", "GBP", "JPY"}),
                fee_bps=290,
                fee_fixed=30,
                max_amount={
                    "USD": 99_999_999,
                    "EUR": 99_999_999,
                    "GBP": 99_999_999,
                    "JPY": 99_999_999,
                },
            ),
            "beta": PspCapability(
                name="beta",
                currencies=frozenset({"USD", "EUR", "GBP", "KWD", "JPY"}),
                fee_bps=250,
                fee_fixed=40,
                max_amount={
                    "USD": 99_999_999,
                    "EUR": 99_999_999,
                    "GBP": 99_999_999,
                    "KWD": 99_999_999,
                    "JPY": 99_999_999,
                },
            ),
        },
        fallback_order=("alpha", "beta"),
    )


def is_rate_limited(result: PspResult) -> bool:
    """Whether ``result`` is a 429 refused before processing (no payment at the PSP).

    The adapter maps 429 to ``retryable_error`` with ``decline_code="rate_limit"`` (or
    message ``HTTP 429`` when the body is unreadable) and no payment reference."""
    if result.outcome != "retryable_error" or result.psp_reference is not None:
        return False
    return result.decline_code == "rate_limit" or result.message == "HTTP 429"


def _guard_unavailable(name: str, exc: Exception) -> PspResult:
    """The guards (breaker, slots, claims) could not be asked: the request was not sent."""
    log.warning("PSP %s guards unavailable, request not sent: %s: %s", name,
                type(exc).__name__, exc)
    return PspResult(
        outcome="not_sent", psp=name,
        message=f"routing guards unavailable ({type(exc).__name__}); not sent",
    )


class UnknownPspError(KeyError):
    """No adapter is configured for the named PSP."""


class Router:
    """Routes authorizations across PSPs with breakers, concurrency limits and failover.

    ``breakers`` and ``limits`` are optional per PSP (a PSP without one is not guarded).
    ``slot_timeout`` is how long to wait for a concurrency slot before treating the PSP as
    unavailable (``not_sent``) and failing over.
    """

    def __init__(
        self,
        adapters: Mapping[str, PspAdapter] | Sequence[PspAdapter],
        table: RoutingTable,
        *,
        breakers: Mapping[str, RedisCircuitBreaker] | None = None,
        limits: Mapping[str, RedisConcurrencyLimit] | None = None,
        claims: Claims | None = None,
        slot_timeout: float = 0.0,
        failover_on_rate_limit: bool = True,
    ) -> None:
        if isinstance(adapters, Mapping):
            self._adapters: dict[str, PspAdapter] = dict(adapters)
        else:
            self._adapters = {adapter.name: adapter for adapter in adapters}
        self.table = table
        self._breakers = dict(breakers or {})
        self._limits = dict(limits or {})
        self._claims = claims
        self._slot_timeout = slot_timeout
        self._failover_on_rate_limit = failover_on_rate_limit

    @property
    def psps(self) -> tuple[str, ...]:
        """Names of the PSPs with an adapter."""
        return tuple(self._adapters)

    def adapter(self, psp: str) -> PspAdapter:
        """The adapter of ``psp``: for capture, void, refund and retrieve, which must go to
        the PSP holding the payment (no failover)."""
        try:
            return self._adapters[psp]
        except KeyError:
            raise UnknownPspError(psp) from None

    def breaker(self, psp: str) -> RedisCircuitBreaker | None:
        return self._breakers.get(psp)

    def plan(self, req: AuthorizeRequest) -> RouteDecision:
        """The candidates for ``req`` (PSPs without an adapter are rejected)."""
        ops: tuple[Operation, ...] = (
            ("authorize", "capture") if req.capture_method == "manual" else ("authorize",)
        )
        decision = plan_route(req.amount, req.currency, req.merchant_id, self.table, operations=ops)
        rejected = dict(decision.rejected)
        candidates: list[str] = []
        for name in decision.candidates:
            if name in self._adapters:
                candidates.append(name)
            else:
                rejected[name] = "no adapter configured"
        return RouteDecision(tuple(candidates), rejected)

    async def authorize(self, req: AuthorizeRequest, *, psp: str | None = None) -> PspResult:
        """Authorize at the first candidate that takes the request (see the module docstring).

        ``psp`` pins the call to one PSP with no failover: use it to retry an attempt that
        a PSP may already have seen (after ``unknown`` or a 5xx). With no eligible PSP the
        result is ``declined`` with ``decline_code`` :data:`NO_ROUTE_CODE` and ``psp=""``.
        """
        if psp is not None:
            self.adapter(psp)  # unknown PSP: fail loudly
            candidates: tuple[str, ...] = (psp,)
        else:
            decision = self.plan(req)
            if not decision.candidates:
                return PspResult(
                    outcome="declined", psp="", decline_code=NO_ROUTE_CODE, message=decision.reason
                )
            candidates = decision.candidates
        if self._claims is not None:
            try:
                owner = await self._claims.owner(req.attempt_id)
            except Exception as exc:  # noqa: BLE001 - cannot tell where it went: send nowhere
                return _guard_unavailable(candidates[0], exc)
            if owner is not None:
                # Sent before (a crash lost the record of it): only the owner may see it.
                return await self._resend_to_owner(owner, req)
        skipped: list[str] = []
        result: PspResult | None = None
        for name in candidates:
            result = await self._try(name, req)
            if not self._may_fail_over(result):
                break
            skipped.append(f"{name}: {result.outcome} ({result.message or result.decline_code})")
        assert result is not None  # noqa: S101 - candidates is never empty here
        if len(skipped) > 1 and self._may_fail_over(result):
            result = result.model_copy(
                update={"message": "no PSP took the request: " + "; ".join(skipped)}
            )
        return result

    def _may_fail_over(self, result: PspResult) -> bool:
        if result.outcome == "not_sent":
            return True
        return self._failover_on_rate_limit and is_rate_limited(result)

    async def _resend_to_owner(self, owner: str, req: AuthorizeRequest) -> PspResult:
        """Re-send an attempt to the PSP that has it: its idempotency key replays the first
        answer. Unreachable now, the outcome is unknown (it may have charged), never a
        failure, and never a failover."""
        result = await self.adapter(owner).authorize(req)
        if result.outcome == "not_sent" or is_rate_limited(result):
            return result.model_copy(update={
                "outcome": "unknown",
                "message": f"attempt {req.attempt_id} was sent to {owner} before; "
                f"{owner} cannot be reached now: {result.message}",
            })
        return result

    async def _try(self, name: str, req: AuthorizeRequest) -> PspResult:
        """One PSP: breaker, concurrency slot, claim, call, report.

        Guard errors (Redis unreachable, a script error) BEFORE the call mean nothing was
        sent: the result is ``not_sent`` with the reason, so the command is retried later
        (and never sent without its claim). Guard errors AFTER the call are logged and
        swallowed: the PSP's answer is what matters (it may be a charge), and losing it to
        a bookkeeping error would take the payment out of the books. A lease left behind
        lapses by its TTL; a lost breaker sample changes nothing that matters.
        """
        try:
            permit, lease, early = await self._guard(name)
        except Exception as exc:  # noqa: BLE001 - nothing was sent; retry later
            return _guard_unavailable(name, exc)
        if early is not None:
            return early
        try:
            if self._claims is not None:
                try:
                    owner = await self._claims.claim(req.attempt_id, name)
                except Exception as exc:  # noqa: BLE001 - unclaimed: must not be sent
                    await self._after_call(name, permit, lease, None)
                    return _guard_unavailable(name, exc)
                if owner != name:  # a concurrent or earlier execution sent it elsewhere
                    await self._after_call(name, permit, lease, None)
                    return await self._resend_to_owner(owner, req)
            result = await self.adapter(name).authorize(req)
        except BaseException:
            await self._after_call(name, permit, lease, None)
            raise
        if self._claims is not None and (
            result.outcome == "not_sent" or is_rate_limited(result)
        ):
            try:
                # Certainly not processed (not sent, or refused with a 429): the attempt
                # may go to another PSP, which a kept claim would forbid.
                await self._claims.release(req.attempt_id, name)
            except Exception as exc:  # noqa: BLE001 - a kept claim only pins the attempt
                log.warning("could not release the claim of %s at %s: %s", req.attempt_id,
                            name, exc)
        await self._after_call(name, permit, lease, result)
        return result

    async def _guard(
        self, name: str
    ) -> tuple[BreakerPermit | None, Lease | None, PspResult | None]:
        """Breaker permit and concurrency slot for ``name``; a third value when refused."""
        breaker = self._breakers.get(name)
        permit: BreakerPermit | None = None
        if breaker is not None:
            permit = await breaker.try_acquire()
            if permit is None:
                return None, None, PspResult(
                    outcome="not_sent", psp=name, message="circuit breaker open"
                )
        limit = self._limits.get(name)
        lease: Lease | None = None
        if limit is not None:
            try:
                lease = await limit.acquire(self._slot_timeout)
            except BaseException:
                if breaker is not None and permit is not None:
                    await breaker.release(permit)
                raise
            if lease is None:
                if breaker is not None and permit is not None:
                    await breaker.release(permit)
                return permit, None, PspResult(
                    outcome="not_sent", psp=name, message="no free concurrency slot"
                )
        return permit, lease, None

    async def _after_call(
        self, name: str, permit: BreakerPermit | None, lease: Lease | None,
        result: PspResult | None,
    ) -> None:
        """Give the slot back and report the result to the breaker; never raises."""
        limit = self._limits.get(name)
        if limit is not None and lease is not None:
            try:
                await limit.release(lease)
            except Exception as exc:  # noqa: BLE001 - the lease lapses by its TTL
                log.warning("could not release a %s concurrency slot: %s", name, exc)
        breaker = self._breakers.get(name)
        if breaker is None or permit is None:
            return
        try:
            if result is None:
                await breaker.release(permit)
            else:
                await breaker.record_result(result, permit)
        except Exception as exc:  # noqa: BLE001 - a lost breaker sample is harmless
            log.warning("could not update the %s circuit breaker: %s", name, exc)

    async def close(self) -> None:
        """Close every adapter."""
        for adapter in self._adapters.values():
            await adapter.close()
