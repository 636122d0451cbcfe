"""Stripe's webhook signature scheme, pure functions (no I/O), for senders and receivers.

Both directions use it: PSP webhooks coming in (header :data:`PSP_SIGNATURE_HEADER`,
verified by the PSP adapters and the ingress) and merchant webhooks going out (header
:data:`MERCHANT_SIGNATURE_HEADER`, signed by the webhook sink, verified by merchants with
:mod:`paystream.webhooks`). It lives in ``schemas`` because it is wire contract that
``psp``, ``sinks``, ``agents`` and the ``paystream`` client all need.

The ``Stripe-Signature`` header is ``t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` where each
``v1`` is ``HMAC-SHA256(secret, f"{t}.{payload}")`` over the raw request body. Several
``v1`` entries may be present (the sender signs with several secrets while one is being
rolled); other schemes (``v0``) are ignored.

A receiver calls :func:`verify_signature` with the raw body (never a re-serialised one),
the header and its secret(s); pass several secrets to accept both while rotating.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "MERCHANT_ATTEMPT_HEADER",
    "MERCHANT_EVENT_ID_HEADER",
    "MERCHANT_SIGNATURE_HEADER",
    "PSP_SIGNATURE_HEADER",
    "SignatureError",
    "compute_signature",
    "sign_payload",
    "verify_signature",
]

PSP_SIGNATURE_HEADER = "Stripe-Signature"
"""The header a PSP signs its webhooks to our ingress with."""
MERCHANT_SIGNATURE_HEADER = "Paystream-Signature"
"""The header we sign merchant webhooks with (same scheme)."""
MERCHANT_EVENT_ID_HEADER = "Paystream-Event-Id"
"""The event id of a merchant webhook, the same on every attempt."""
MERCHANT_ATTEMPT_HEADER = "Paystream-Delivery-Attempt"
"""1 on a merchant webhook's first attempt, then 2, 3, ..."""
DEFAULT_TOLERANCE_S = 300
_SCHEME = "v1"


class SignatureError(ValueError):
    """The webhook signature header is malformed, does not match, or is out of tolerance."""


def compute_signature(payload: bytes, secret: str, timestamp: int) -> str:
    """Hex ``HMAC-SHA256(secret, f"{timestamp}.{payload}")``."""
    signed = str(timestamp).encode("ascii") + b"." + payload
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header value ``t=<timestamp>,v1=<signature>``."""
    return f"t={timestamp},{_SCHEME}={compute_signature(payload, secret, timestamp)}"


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise SignatureError(f"Malformed signature header: bad element {item.strip()!r}")
        if key == "t":
            if timestamp is not None:
                raise SignatureError("Malformed signature header: more than one timestamp")
            if not value.isascii() or not value.isdigit():
                raise SignatureError(f"Malformed signature header: bad timestamp {value!r}")
            timestamp = int(value)
        elif key == _SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("Malformed signature header: no timestamp (t=...)")
    if not signatures:
        raise SignatureError(f"Malformed signature header: no {_SCHEME} signature")
    return timestamp, signatures


def verify_signature(
    payload: bytes,
    header: str,
    secrets: str | Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE_S,
    now: int | None = None,
) -> int:
    """Check a ``Stripe-Signature`` header against the raw ``payload``; return its timestamp.

    ``secrets`` is one secret or several (any may match: rotation). The timestamp must be
    within ``tolerance`` seconds of ``now`` (default: the current time) in either direction.
    Every comparison is constant-time. Raises :class:`SignatureError` on any failure.
    """
    candidates = [secrets] if isinstance(secrets, str) else list(secrets)
    if not candidates or not all(candidates):
        raise SignatureError("No (or an empty) webhook secret to verify with")
    if tolerance < 0:
        raise SignatureError("tolerance must not be negative")
    timestamp, signatures = _parse_header(header)
    matched = False
    for secret in candidates:
        expected = compute_signature(payload, secret, timestamp)
        for signature in signatures:
            # No early exit: the work done does not depend on which entry matches.
            matched |= hmac.compare_digest(expected.encode(), signature.encode())
    if not matched:
        raise SignatureError(
            "No signatures found matching the expected signature for payload "
            "(wrong secret, or the body was altered)"
        )
    current = int(time.time()) if now is None else now
    if current - timestamp > tolerance:
        raise SignatureError(
            f"Timestamp outside the tolerance zone: {current - timestamp}s old "
            f"(tolerance {tolerance}s)"
        )
    if timestamp - current > tolerance:
        raise SignatureError(
            f"Timestamp outside the tolerance zone: {timestamp - current}s in the future "
            f"(tolerance {tolerance}s)"
        )
    return timestamp
