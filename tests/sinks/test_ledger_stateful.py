"""Stateful property test: random lifecycles of one merchant against an in-memory model.

Rules: authorize, capture (full and partial) against a hold, capture without a hold, void,
expire, refund, payout, dispute, and replaying any earlier event (same event id again).
After every step the merchant's balances, holds and payment counters in PostgreSQL equal
the model's (refunds + disputes <= captured, holds never resolved beyond their amount are
checked by the model and by the CHECK constraints), and the whole ledger passes
``verify()`` at the end of every few examples.

Runtime: one connection for the whole run; no truncation between examples -- each example
uses a fresh merchant id (so fresh accounts) and fresh payment/event ids. CI (``CI=true``)
runs 2,000 examples of up to 10 steps; locally 200.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sinks.ledger import (
    AuthorizationHold,
    CapturePosting,
    DisputePosting,
    HoldCapture,
    HoldRelease,
    PayoutPosting,
    PostingResult,
    RefundPosting,
    merchant_balances,
    post_authorizations,
    post_captures,
    post_disputes,
    post_hold_captures,
    post_payouts,
    post_refunds,
    release_holds,
    verify,
)

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
EXAMPLES = 2_000 if CI else 200
VERIFY_EVERY = 25  # examples between global verify() runs (it scans the whole ledger)
T0 = datetime(2024, 5, 1, tzinfo=UTC)
AMOUNTS = st.integers(1, 5_000)


def around(limit: int, top: int) -> st.SearchStrategy[int]:
    """A positive amount, often exactly at ``limit`` or one past it (where rules bite)."""
    edges = [n for n in (limit, limit + 1) if n >= 1]
    return st.one_of(st.integers(1, max(1, top)), st.sampled_from(edges or [1]))


T = TypeVar("T")
Posting = (
    AuthorizationHold
    | HoldCapture
    | HoldRelease
    | CapturePosting
    | RefundPosting
    | PayoutPosting
    | DisputePosting
)


@dataclass
class Hold:
    amount: int
    captured: int = 0
    released: int = 0
    closed: bool = False


@dataclass
class Payment:
    captured: int = 0
    fees: int = 0
    refunded: int = 0
    fees_refunded: int = 0
    disputed: int = 0


@dataclass
class Model:
    available: int = 0
    pending: int = 0
    receivable: int = 0
    holds: dict[str, Hold] = field(default_factory=dict)
    payments: dict[str, Payment] = field(default_factory=dict)
    posted: set[str] = field(default_factory=set)

    def expect(self, posting: Posting) -> str | None:
        """Apply ``posting`` to the model: its reject reason, or None when it posts."""
        if isinstance(posting, AuthorizationHold):
            if posting.payment_id in self.holds:
                return "hold_exists"
            self.holds[posting.payment_id] = Hold(posting.amount)
            self.pending += posting.amount
        elif isinstance(posting, HoldCapture):
            hold = self.holds.get(posting.payment_id)
            if hold is None:
                return "unknown_hold"
            if hold.closed:
                return "hold_released"
            if hold.captured + hold.released + posting.amount > hold.amount:
                return "capture_exceeds_hold"
            hold.captured += posting.amount
            self.pending -= posting.amount
            self._captured(posting.payment_id, posting.amount, posting.fee)
        elif isinstance(posting, HoldRelease):
            hold = self.holds.get(posting.payment_id)
            if hold is None:
                return "unknown_hold"
            if hold.closed:
                return "hold_released"
            if hold.captured >= hold.amount:
                return "hold_fully_captured"
            hold.released = hold.amount - hold.captured
            hold.closed = True
            self.pending -= hold.released
        elif isinstance(posting, CapturePosting):
            self._captured(posting.payment_id, posting.amount, posting.fee)
        elif isinstance(posting, RefundPosting):
            pay = self.payments.get(posting.payment_id)
            if pay is None:
                return "unknown_payment"
            if pay.refunded + pay.disputed + posting.amount > pay.captured:
                return "refund_exceeds_captured"
            if pay.fees_refunded + posting.fee_refund > pay.fees:
                return "fee_refund_exceeds_fees"
            if self.available < posting.amount - posting.fee_refund:
                return "insufficient_funds"
            pay.refunded += posting.amount
            pay.fees_refunded += posting.fee_refund
            self.available -= posting.amount - posting.fee_refund
        elif isinstance(posting, PayoutPosting):
            if self.available < posting.amount:
                return "insufficient_funds"
            self.available -= posting.amount
        else:
            pay = self.payments.get(posting.payment_id)
            if pay is None:
                return "unknown_payment"
            if pay.refunded + pay.disputed + posting.amount > pay.captured:
                return "dispute_exceeds_captured"
            covered = min(posting.amount, max(self.available, 0))
            self.available -= covered
            self.receivable += posting.amount - covered
            pay.disputed += posting.amount
        return None

    def _captured(self, payment_id: str, amount: int, fee: int) -> None:
        pay = self.payments.setdefault(payment_id, Payment())
        pay.captured += amount
        pay.fees += fee
        self.available += amount - fee


async def send(conn: asyncpg.Connection, posting: Posting) -> PostingResult:
    """Post one posting with the function of its type (captures wrapped as a result)."""
    if isinstance(posting, CapturePosting):
        posted = await post_captures(conn, [posting])
        return PostingResult(
            posted=posted,
            posted_event_ids=[posting.event_id] if posted else [],
            duplicates=[] if posted else [posting.event_id],
            rejected=[],
        )
    if isinstance(posting, AuthorizationHold):
        return await post_authorizations(conn, [posting])
    if isinstance(posting, HoldCapture):
        return await post_hold_captures(conn, [posting])
    if isinstance(posting, HoldRelease):
        return await release_holds(conn, [posting])
    if isinstance(posting, RefundPosting):
        return await post_refunds(conn, [posting])
    if isinstance(posting, PayoutPosting):
        return await post_payouts(conn, [posting])
    return await post_disputes(conn, [posting])


class LedgerMachine(RuleBasedStateMachine):
    runner: ClassVar[asyncio.Runner]
    conn: ClassVar[asyncpg.Connection]
    examples: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.example = next(self.examples)
        self.merchant = f"sm{self.example}_{secrets.token_hex(4)}"
        self.currency = "USD"
        self.model = Model()
        self.history: list[Posting] = []
        self.ids = itertools.count()

    # ------------------------------------------------------------------ helpers
    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def next_id(self, prefix: str) -> str:
        return f"{self.merchant}:{prefix}{next(self.ids)}"

    def common(self, prefix: str) -> dict[str, Any]:
        return {
            "event_id": self.next_id(prefix),
            "merchant_id": self.merchant,
            "currency": self.currency,
            "occurred_at": T0 + timedelta(seconds=len(self.history)),
        }

    def apply(self, posting: Posting) -> None:
        """Post it; the outcome must be the model's (duplicate, posted or the same reason)."""
        self.history.append(posting)
        result = self.run(send(self.conn, posting))
        if posting.event_id in self.model.posted:
            assert result.posted == 0 and not result.rejected, result
            assert result.duplicates == [posting.event_id], result
            return
        reason = self.model.expect(posting)
        if reason is None:
            assert result.posted_event_ids == [posting.event_id], (posting, result)
            self.model.posted.add(posting.event_id)
        else:
            assert result.posted == 0, (posting, result)
            assert result.rejected_ids == {posting.event_id: reason}, (posting, result)

    def pick(self, data: st.DataObject, keys: list[str]) -> str:
        """One of ``keys`` (sorted, so shrinking is stable) or sometimes an unknown id."""
        unknown = f"{self.merchant}:unknown"
        if not keys or data.draw(st.integers(0, 9)) == 0:
            return unknown
        return data.draw(st.sampled_from(sorted(keys)))

    # ------------------------------------------------------------------ rules
    @initialize(
        currency=st.sampled_from(["USD", "JPY", "KWD"]),
        captured=AMOUNTS,
        held=AMOUNTS,
        data=st.data(),
    )
    def start(self, currency: str, captured: int, held: int, data: st.DataObject) -> None:
        """Every example starts with one captured payment and one open hold to work on."""
        self.currency = currency
        self.capture_without_hold(captured, data)
        self.apply(
            AuthorizationHold(payment_id=self.next_id("pay"), amount=held, **self.common("a"))
        )

    @rule(amount=AMOUNTS, data=st.data(), reuse=st.booleans())
    def authorize(self, amount: int, data: st.DataObject, reuse: bool) -> None:
        existing = sorted(self.model.holds) + sorted(self.model.payments)
        if reuse and existing:
            payment_id = data.draw(st.sampled_from(existing))
        else:
            payment_id = self.next_id("pay")
        self.apply(AuthorizationHold(payment_id=payment_id, amount=amount, **self.common("a")))

    @rule(data=st.data())
    def capture_full(self, data: st.DataObject) -> None:
        payment_id = self.pick(data, list(self.model.holds))
        hold = self.model.holds.get(payment_id)
        amount = max(1, hold.amount - hold.captured - hold.released) if hold else 1
        fee = data.draw(st.integers(0, amount))
        self.apply(HoldCapture(payment_id=payment_id, amount=amount, fee=fee, **self.common("c")))

    @precondition(lambda self: bool(self.model.holds))
    @rule(data=st.data())
    def capture_partial(self, data: st.DataObject) -> None:
        payment_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        hold = self.model.holds[payment_id]
        left = hold.amount - hold.captured - hold.released
        amount = data.draw(around(left, hold.amount))  # may exceed what is left
        fee = data.draw(st.integers(0, amount))
        self.apply(HoldCapture(payment_id=payment_id, amount=amount, fee=fee, **self.common("c")))

    @rule(amount=AMOUNTS, data=st.data())
    def capture_without_hold(self, amount: int, data: st.DataObject) -> None:
        fee = data.draw(st.integers(0, amount))
        fields = self.common("k")
        fields.pop("merchant_id")
        self.apply(
            CapturePosting(
                payment_id=self.next_id("pay"),
                merchant_id=self.merchant,
                amount=amount,
                fee=fee,
                **fields,
            )
        )

    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        payment_id = self.pick(data, list(self.model.holds))
        self.apply(HoldRelease(payment_id=payment_id, reason="void", **self.common("v")))

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        payment_id = self.pick(data, list(self.model.holds))
        self.apply(HoldRelease(payment_id=payment_id, reason="expiry", **self.common("x")))

    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        payment_id = self.pick(data, list(self.model.payments))
        pay = self.model.payments.get(payment_id)
        left = pay.captured - pay.refunded - pay.disputed if pay else 1
        amount = data.draw(around(left, pay.captured if pay else 100))
        fees_left = pay.fees - pay.fees_refunded if pay else 0
        fee_refund = data.draw(
            st.one_of(st.integers(0, amount), st.sampled_from([min(amount, fees_left)]))
        )
        self.apply(
            RefundPosting(
                payment_id=payment_id,
                refund_id=self.next_id("re"),
                amount=amount,
                fee_refund=fee_refund,
                **self.common("r"),
            )
        )

    @rule(data=st.data())
    def payout(self, data: st.DataObject) -> None:
        amount = data.draw(around(self.model.available, self.model.available + 10))
        self.apply(PayoutPosting(payout_id=self.next_id("po"), amount=amount, **self.common("o")))

    @rule(data=st.data())
    def dispute(self, data: st.DataObject) -> None:
        payment_id = self.pick(data, list(self.model.payments))
        pay = self.model.payments.get(payment_id)
        left = pay.captured - pay.refunded - pay.disputed if pay else 1
        amount = data.draw(around(left, pay.captured if pay else 100))
        self.apply(
            DisputePosting(
                payment_id=payment_id,
                dispute_id=self.next_id("dp"),
                amount=amount,
                **self.common("d"),
            )
        )

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.history) - 1))
        self.apply(self.history[index])

    # ------------------------------------------------------------------ invariants
    @invariant()
    def database_matches_model(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        conn, model = self.conn, self.model
        balances = await merchant_balances(conn, self.merchant)
        got = balances.get(self.currency)
        actual = (got.available, got.pending, got.receivable) if got else (0, 0, 0)
        assert actual == (model.available, model.pending, model.receivable)
        assert set(balances) <= {self.currency}

        holds = await conn.fetch(
            "SELECT payment_id, amount, captured, released, release_event_id IS NOT NULL "
            "AS closed FROM ledger_holds WHERE merchant_id = $1",
            self.merchant,
        )
        assert {
            r["payment_id"]: (r["amount"], r["captured"], r["released"], r["closed"]) for r in holds
        } == {p: (h.amount, h.captured, h.released, h.closed) for p, h in model.holds.items()}
        for h in model.holds.values():
            assert h.captured + h.released <= h.amount

        payments = await conn.fetch(
            "SELECT payment_id, captured, fees, refunded, fees_refunded, disputed "
            "FROM ledger_payments WHERE merchant_id = $1",
            self.merchant,
        )
        assert {r["payment_id"]: tuple(r.values())[1:] for r in payments} == {
            p: (m.captured, m.fees, m.refunded, m.fees_refunded, m.disputed)
            for p, m in model.payments.items()
        }
        for m in model.payments.values():
            assert m.refunded + m.disputed <= m.captured

    def teardown(self) -> None:
        if self.example % VERIFY_EVERY == 0:
            report = self.run(verify(self.conn))
            assert report.ok, report.violations


@pytest.fixture
def machine_connection(ledger_dsn: str) -> Iterator[None]:
    """One event loop and one connection for every example of the state machine."""
    with asyncio.Runner() as runner:
        conn = runner.run(asyncpg.connect(ledger_dsn))
        LedgerMachine.runner = runner
        LedgerMachine.conn = conn
        try:
            yield
        finally:
            runner.run(conn.close())


@pytest.mark.timeout(600)
def test_ledger_lifecycle_state_machine(machine_connection: None) -> None:
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=10,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    report = LedgerMachine.runner.run(verify(LedgerMachine.conn))
    assert report.ok, report.violations
