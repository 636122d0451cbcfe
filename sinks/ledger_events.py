"""From payment events to ledger postings: which event posts what, in which order.

* ``payment.authorized`` (manual capture) places a hold for the authorized amount;
* ``payment.captured`` of a manual-capture payment captures against that hold;
* ``payment.captured`` of an automatic-capture payment posts the capture directly (the
  PSP authorized and captured in one call, so there is no hold to resolve);
* a partial ``payment.captured`` of a manual-capture payment releases the rest of the
  hold (the authorization ends with its capture, as with Stripe);
* ``payment.canceled`` of a manual-capture payment releases the rest of its hold (reason
  ``expiry`` when the authorization expired, else ``void``);
* ``payment.refunded`` gives ``amount_refunded_now`` back: the merchant's wallet pays it
  less ``fee_refunded_now``, our fee returned in proportion (the whole rest of the fee on
  the refund that completes the payment), so a full refund never overdraws the wallet.

Replayed events (answers to repeated commands) are posted like originals: a replay has the
original's event id, so posting is a no-op when the original was posted and repairs the
ledger when the original was lost before reaching the broker. Holds are posted before
captures, so an authorization and its capture in one batch post in the right order.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from schemas.events import PaymentEvent
from sinks import ledger


class UnpostableEvent(ValueError):
    """The event cannot be expressed as a ledger posting (a malformed event)."""


def _currency(event: PaymentEvent) -> str:
    if event.currency is None:
        raise UnpostableEvent(f"{event.type} {event.event_id} has no currency")
    return event.currency


def check_postable(event: PaymentEvent) -> None:
    """Raise :class:`UnpostableEvent` (or a validation error) for an event that cannot post."""
    if event.type == "payment.authorized":
        _hold(event)
    elif event.type == "payment.captured":
        if event.capture_method == "manual":
            _hold_capture(event)
        else:
            _capture(event)
    elif event.type == "payment.canceled" and event.capture_method == "manual":
        _release(event)
    elif event.type == "payment.refunded":
        _refund(event)


def _release(event: PaymentEvent) -> ledger.HoldRelease:
    return ledger.HoldRelease(
        event_id=event.event_id,
        merchant_id=event.merchant_id,
        currency=_currency(event),
        occurred_at=event.occurred_at,
        payment_id=event.payment_id,
        reason="expiry" if event.reason == "authorization_expired" else "void",
    )


def _capture_remainder_release(event: PaymentEvent) -> ledger.HoldRelease:
    return ledger.HoldRelease(
        event_id=f"{event.event_id}:release",
        merchant_id=event.merchant_id,
        currency=_currency(event),
        occurred_at=event.occurred_at,
        payment_id=event.payment_id,
        reason="void",
    )


def _refund(event: PaymentEvent) -> ledger.RefundPosting:
    if event.refund_id is None:
        raise UnpostableEvent(f"payment.refunded {event.event_id} has no refund_id")
    return ledger.RefundPosting(
        event_id=event.event_id,
        merchant_id=event.merchant_id,
        currency=_currency(event),
        occurred_at=event.occurred_at,
        payment_id=event.payment_id,
        refund_id=event.refund_id,
        amount=event.amount_refunded_now,
        fee_refund=event.fee_refunded_now,
    )


def _hold(event: PaymentEvent) -> ledger.AuthorizationHold:
    return ledger.AuthorizationHold(
        event_id=event.event_id,
        merchant_id=event.merchant_id,
        currency=_currency(event),
        occurred_at=event.occurred_at,
        payment_id=event.payment_id,
        amount=event.amount,
    )


def _hold_capture(event: PaymentEvent) -> ledger.HoldCapture:
    return ledger.HoldCapture(
        event_id=event.event_id,
        merchant_id=event.merchant_id,
        currency=_currency(event),
        occurred_at=event.occurred_at,
        payment_id=event.payment_id,
        amount=event.amount_captured_now,
        fee=event.fee,
    )


def _capture(event: PaymentEvent) -> ledger.CapturePosting:
    return ledger.CapturePosting(
        event_id=event.event_id,
        payment_id=event.payment_id,
        merchant_id=event.merchant_id,
        amount=event.amount_captured_now,
        fee=event.fee,
        currency=_currency(event),
        occurred_at=event.occurred_at,
    )


async def post_payment_events(
    conn: asyncpg.Connection, events: Sequence[PaymentEvent]
) -> tuple[int, list[ledger.Rejection]]:
    """Post what ``events`` mean for the ledger; returns (newly posted, rejections).

    Call :func:`check_postable` on each event first; this function assumes they pass.
    """
    holds = [_hold(e) for e in events if e.type == "payment.authorized"]
    captured = [e for e in events if e.type == "payment.captured"]
    hold_captures = [_hold_capture(e) for e in captured if e.capture_method == "manual"]
    direct = [_capture(e) for e in captured if e.capture_method != "manual"]
    posted = 0
    rejected: list[ledger.Rejection] = []
    if holds:
        result = await ledger.post_authorizations(conn, holds)
        posted += result.posted
        rejected.extend(result.rejected)
    if hold_captures:
        result = await ledger.post_hold_captures(conn, hold_captures)
        posted += result.posted
        rejected.extend(result.rejected)
    if direct:
        posted += await ledger.post_captures(conn, direct)
    # Releases and refunds come after captures: a batch may hold a payment's whole life.
    releases = [
        _release(e) for e in events
        if e.type == "payment.canceled" and e.capture_method == "manual"
    ]
    # A partial capture ends the authorization (as with Stripe): the rest of the hold goes
    # back to the customer at once.
    releases += [
        _capture_remainder_release(e) for e in captured
        if e.capture_method == "manual" and e.amount_captured < e.amount
    ]
    refunds = [_refund(e) for e in events if e.type == "payment.refunded"]
    if releases:
        result = await ledger.release_holds(conn, releases)
        posted += result.posted
        rejected.extend(result.rejected)
    if refunds:
        result = await ledger.post_refunds(conn, refunds)
        posted += result.posted
        rejected.extend(result.rejected)
    return posted, rejected
