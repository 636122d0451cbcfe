"""The command processor's state machine, with a fake PSP (pure logic, no I/O)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.executor import Executor
from agents.intake import Accepted, parse_command
from agents.processor import CommandProcessor
from agents.state import TERMINAL, PaymentState
from psp.protocol import (
    AuthorizeRequest,
    CaptureRequest,
    PspResult,
    RefundRequest,
    VoidRequest,
)
from psp.routing import PspCapability, Router, RoutingTable


class ApprovingPsp:
    """Approves everything; remembers each idempotency key it saw."""

    name = "fake"

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def authorize(self, req: AuthorizeRequest) -> PspResult:
        self.keys.append(req.attempt_id)
        return PspResult(outcome="succeeded", psp="fake", psp_reference=f"pi_{req.payment_id}",
                         status="requires_capture", amount_authorized=req.amount)

    async def capture(self, req: CaptureRequest) -> PspResult:
        self.keys.append(req.attempt_id)
        return PspResult(outcome="succeeded", psp="fake", psp_reference=req.psp_reference,
                         amount_captured=req.amount)

    async def void(self, req: VoidRequest) -> PspResult:
        raise NotImplementedError

    async def refund(self, req: RefundRequest) -> PspResult:
        raise NotImplementedError

    async def retrieve(self, *, psp_reference: str | None = None,
                       attempt_id: str | None = None) -> PspResult:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def accepted(kind: str, key: str, amount: int | None = None) -> Accepted:
    import json

    body: dict[str, object] = {
        "type": kind, "schema_version": 1, "command_id": f"c_{key}", "merchant_id": "m",
        "idempotency_key": key, "payment_id": "pay", "created_at": datetime.now(UTC).isoformat(),
    }
    if kind == "authorize_payment":
        body.update(amount=amount or 1000, currency="USD", payment_method="tok_visa",
                    capture_method="manual")
    elif amount is not None:
        body["amount"] = amount
    verdict = parse_command(json.dumps(body).encode())
    assert isinstance(verdict, Accepted)
    return verdict


commands = st.lists(
    st.tuples(
        st.sampled_from(["authorize_payment", "capture_payment"]),
        st.sampled_from(["k1", "k2", "k3", "k4"]),
        st.one_of(st.none(), st.integers(1, 1500)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(commands)
def test_invariants_hold_for_any_command_sequence(
    sequence: list[tuple[str, str, int | None]],
) -> None:
    psp = ApprovingPsp()
    table = RoutingTable(
        psps={"fake": PspCapability("fake", frozenset({"USD"}), fee_bps=0, fee_fixed=0)},
        fallback_order=("fake",),
    )
    processor = CommandProcessor(Executor(Router([psp], table), 290, 30))
    state: PaymentState | None = None
    seen_terminal: str | None = None
    fingerprints: dict[str, str] = {}

    async def run() -> None:
        nonlocal state, seen_terminal
        for kind, key, amount in sequence:
            if kind == "authorize_payment" and amount is None:
                amount = 1000
            command = accepted(kind, key, amount)
            before = state.model_copy(deep=True) if state else None
            state, events = await processor.handle(before, command)
            assert len(events) == 1
            event = events[0]
            if key in fingerprints and fingerprints[key] != command.fingerprint:
                assert event.type == "payment.rejected"
            if event.replayed:
                assert state == before  # a replay changes nothing
            if state is not None:
                assert 0 <= state.amount_captured <= state.amount
                if seen_terminal is not None:
                    assert state.status == seen_terminal  # terminal states never move
                if state.status in TERMINAL:
                    seen_terminal = state.status
                for stored_key, record in state.commands.items():
                    assert fingerprints.setdefault(stored_key, record.fingerprint) == (
                        record.fingerprint
                    )

    asyncio.run(run())
    assert len(psp.keys) == len(set(psp.keys))  # every PSP call had its own attempt id
