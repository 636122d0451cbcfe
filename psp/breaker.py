"""A circuit breaker per PSP whose state lives in Redis, so every worker sees the same state.

Policy (consecutive failures, not a failure ratio):

``closed``
    Calls flow. Each failure increments a shared counter of *consecutive* failures; any
    success resets it to zero. When it reaches ``failure_threshold`` the breaker opens.
    (Consecutive counting needs one counter and no window bookkeeping; with the executor's
    low per-PSP concurrency and inline retries a burst of 5xx/timeouts shows up as a run.)
``open``
    :meth:`RedisCircuitBreaker.allow` says no until ``open_seconds`` have passed since the
    breaker opened. Results that arrive while open (calls started before it opened) are
    ignored.
``half_open``
    The first :meth:`~RedisCircuitBreaker.allow` after the cool-down moves the breaker to
    half-open. At most ``half_open_max_calls`` trial calls may be in flight at once,
    across all workers: the slot is taken inside a Lua script, so two workers can never
    both take the single slot. A trial failure re-opens the breaker (a new cool-down); after
    ``success_threshold`` trial successes it closes. Only results of trial calls count
    while half-open. A trial slot that is never reported (worker crashed mid-call) expires
    after ``trial_timeout_seconds``.

What counts as a failure (:data:`FAILURE_OUTCOMES`): ``not_sent`` (connection refused,
credentials rejected), ``retryable_error`` (5xx, 429) and ``unknown`` (timeouts, dropped
connections). ``succeeded``, ``declined`` and ``requires_action`` are successes: a card
decline comes from a healthy PSP. :meth:`RedisCircuitBreaker.record_result` refines this
for a whole :class:`~psp.protocol.PspResult`: a *retryable decline* (``processing_error``,
which carries the PSP's payment reference) is a processed answer, so a success.

Redis layout (hash tags keep both keys in one cluster slot)::

    {prefix}:breaker:{psp}          hash  state, failures, successes, opened_at, opens
    {prefix}:breaker:{psp}:trials   zset  trial token -> expiry time

Time comes from the injectable ``clock`` (default :func:`time.time`, wall-clock seconds,
so workers on different hosts agree to within their clock skew) and is passed into the
scripts; timestamps are stored in Redis, never in process memory.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import redis.asyncio as aioredis

from psp.protocol import PspResult

BreakerState = Literal["closed", "open", "half_open"]

FAILURE_OUTCOMES: Final[frozenset[str]] = frozenset({"not_sent", "retryable_error", "unknown"})
"""Outcomes that count against a PSP's health."""

SUCCESS_OUTCOMES: Final[frozenset[str]] = frozenset({"succeeded", "declined", "requires_action"})
"""Outcomes that show the PSP is healthy (a decline is a healthy PSP's answer)."""

_ALLOW_LUA = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local now = tonumber(ARGV[1])
if state == 'closed' then
  return {1, 'closed'}
end
if state == 'open' then
  local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
  if now < opened + tonumber(ARGV[2]) then
    return {0, 'open'}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'successes', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5])
  return {1, 'half_open'}
end
return {0, 'half_open'}
"""

_RECORD_LUA = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local fail = ARGV[2] == '1'
if state == 'closed' then
  if fail then
    local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if n >= tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1],
                 'failures', 0, 'successes', 0)
      redis.call('HINCRBY', KEYS[1], 'opens', 1)
      redis.call('DEL', KEYS[2])
      return 'open'
    end
  else
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  end
  return 'closed'
end
if state == 'open' then
  return 'open'
end
local counted = 0
if ARGV[5] ~= '' then
  counted = redis.call('ZREM', KEYS[2], ARGV[5])
elseif ARGV[6] == '0' then
  local popped = redis.call('ZPOPMIN', KEYS[2])
  if #popped > 0 then counted = 1 end
end
if counted == 0 then
  return 'half_open'
end
if fail then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1],
             'failures', 0, 'successes', 0)
  redis.call('HINCRBY', KEYS[1], 'opens', 1)
  redis.call('DEL', KEYS[2])
  return 'open'
end
local s = redis.call('HINCRBY', KEYS[1], 'successes', 1)
if s >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0)
  redis.call('DEL', KEYS[2])
  return 'closed'
end
return 'half_open'
"""


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def is_failure(outcome: str) -> bool:
    """Whether ``outcome`` counts against the PSP; :class:`ValueError` for a non-outcome."""
    if outcome in FAILURE_OUTCOMES:
        return True
    if outcome in SUCCESS_OUTCOMES:
        return False
    raise ValueError(f"not a PSP outcome: {outcome!r}")


def result_is_failure(result: PspResult) -> bool:
    """Like :func:`is_failure`, but a retryable *decline* (the PSP processed the request and
    returned a payment reference, e.g. ``processing_error``) is a healthy answer."""
    if result.outcome == "retryable_error" and result.psp_reference is not None:
        return False
    return is_failure(result.outcome)


@dataclass(frozen=True, slots=True)
class BreakerPermit:
    """Permission for one call, from :meth:`RedisCircuitBreaker.try_acquire`.

    ``trial`` is the half-open trial slot's token (``None`` when the breaker was closed).
    Hand the permit back to :meth:`RedisCircuitBreaker.record` so exactly that trial is
    counted, or to :meth:`RedisCircuitBreaker.release` when the call was not made."""

    psp: str
    trial: str | None


class RedisCircuitBreaker:
    """The shared circuit breaker of one PSP. See the module docstring for the policy."""

    def __init__(
        self,
        redis: aioredis.Redis,
        psp: str,
        *,
        failure_threshold: int = 5,
        open_seconds: float = 5.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        trial_timeout_seconds: float = 30.0,
        key_prefix: str = "paystream",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if failure_threshold < 1 or half_open_max_calls < 1 or success_threshold < 1:
            raise ValueError("thresholds and half_open_max_calls must be at least 1")
        if open_seconds < 0 or trial_timeout_seconds <= 0:
            raise ValueError("open_seconds must be >= 0 and trial_timeout_seconds > 0")
        self._redis = redis
        self.psp = psp
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.half_open_max_calls = half_open_max_calls
        self.success_threshold = success_threshold
        self.trial_timeout_seconds = trial_timeout_seconds
        self._clock = clock
        self._key = f"{key_prefix}:breaker:{{{psp}}}"
        self._trials_key = f"{self._key}:trials"
        self._allow = redis.register_script(_ALLOW_LUA)
        self._record = redis.register_script(_RECORD_LUA)

    @property
    def keys(self) -> tuple[str, str]:
        """The Redis keys holding this breaker (state hash, trial slots)."""
        return self._key, self._trials_key

    async def try_acquire(self) -> BreakerPermit | None:
        """Permission for one call, or ``None`` while open (or all trial slots are taken).

        May move ``open`` to ``half_open`` (cool-down over) and take a trial slot, atomically."""
        token = secrets.token_hex(8)
        reply = await self._allow(
            keys=[self._key, self._trials_key],
            args=[
                repr(self._clock()),
                repr(self.open_seconds),
                self.half_open_max_calls,
                repr(self.trial_timeout_seconds),
                token,
            ],
        )
        allowed, state = int(reply[0]), _text(reply[1])
        if not allowed:
            return None
        return BreakerPermit(self.psp, token if state == "half_open" else None)

    async def allow(self) -> bool:
        """``False`` when the breaker is open (or half-open with every trial slot taken).

        A ``True`` while half-open holds a trial slot: report the call with :meth:`record`
        (which then counts the oldest trial in flight). Prefer :meth:`try_acquire` to tie the
        result to its own trial."""
        return await self.try_acquire() is not None

    async def record(self, outcome: str, permit: BreakerPermit | None = None) -> BreakerState:
        """Report a call's outcome; returns the breaker's state afterwards."""
        return await self._report(is_failure(outcome), permit)

    async def record_result(
        self, result: PspResult, permit: BreakerPermit | None = None
    ) -> BreakerState:
        """Report a call's :class:`PspResult` (see :func:`result_is_failure`)."""
        return await self._report(result_is_failure(result), permit)

    async def _report(self, failure: bool, permit: BreakerPermit | None) -> BreakerState:
        token = permit.trial if permit is not None and permit.trial is not None else ""
        reply = await self._record(
            keys=[self._key, self._trials_key],
            args=[
                repr(self._clock()),
                "1" if failure else "0",
                self.failure_threshold,
                self.success_threshold,
                token,
                "1" if permit is not None else "0",
            ],
        )
        return _as_state(_text(reply))

    async def release(self, permit: BreakerPermit) -> None:
        """Give back a permit whose call was never made (frees its trial slot, if any)."""
        if permit.trial is not None:
            await self._redis.zrem(self._trials_key, permit.trial)

    async def state(self) -> BreakerState:
        """The state as every worker sees it. An ``open`` breaker whose cool-down is over
        reads as ``half_open`` (the next :meth:`allow` takes a trial slot)."""
        raw_state, raw_opened = await self._redis.hmget(self._key, ["state", "opened_at"])
        state = _as_state(_text(raw_state)) if raw_state is not None else "closed"
        if state == "open" and raw_opened is not None:
            if self._clock() >= float(_text(raw_opened)) + self.open_seconds:
                return "half_open"
        return state

    async def failures(self) -> int:
        """Consecutive failures counted while closed."""
        raw = await self._redis.hget(self._key, "failures")
        return int(_text(raw)) if raw is not None else 0

    async def reset(self) -> None:
        """Force the breaker closed and forget its history (operator action)."""
        await self._redis.delete(self._key, self._trials_key)


def _as_state(raw: str) -> BreakerState:
    if raw == "closed":
        return "closed"
    if raw == "open":
        return "open"
    if raw == "half_open":
        return "half_open"
    raise ValueError(f"unexpected breaker state in Redis: {raw!r}")
