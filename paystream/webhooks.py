"""Verify paystream's merchant webhooks (for merchant backends; standard library only).

Every webhook paystream sends is a ``POST`` of one event (JSON) with the headers

- ``Paystream-Signature: t=<unix seconds>,v1=<hex>`` where ``<hex>`` is
  ``HMAC-SHA256(secret, "<t>.<raw body>")``; while a secret is being rotated there is one
  ``v1=`` per secret, and either may match;
- ``Paystream-Event-Id``: the event id, the same on every attempt (deduplicate on it);
- ``Paystream-Delivery-Attempt``: 1 on the first attempt, then 2, 3, ...

Verify over the raw body bytes, before parsing them::

    from paystream.webhooks import SIGNATURE_HEADER, SignatureError, verify_signature

    try:
        event = verify_signature(raw_body, request.headers[SIGNATURE_HEADER], secret)
    except SignatureError:
        return 400
    # handle event["type"] / event["event_id"]; answer 2xx quickly

The receiving guide is docs/webhooks.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from schemas.signatures import (
    DEFAULT_TOLERANCE_S,
    MERCHANT_ATTEMPT_HEADER,
    MERCHANT_EVENT_ID_HEADER,
    MERCHANT_SIGNATURE_HEADER,
    SignatureError,
    compute_signature,
)
from schemas.signatures import verify_signature as _verify

__all__ = [
    "ATTEMPT_HEADER",
    "DEFAULT_TOLERANCE_S",
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "SignatureError",
    "compute_signature",
    "verify_signature",
]

SIGNATURE_HEADER = MERCHANT_SIGNATURE_HEADER
EVENT_ID_HEADER = MERCHANT_EVENT_ID_HEADER
ATTEMPT_HEADER = MERCHANT_ATTEMPT_HEADER


def verify_signature(
    payload: bytes,
    header: str,
    secret: str | Sequence[str],
    tolerance: int = DEFAULT_TOLERANCE_S,
    *,
    now: int | None = None,
) -> dict[str, Any]:
    """Check a ``Paystream-Signature`` header against the raw ``payload``; return the event.

    ``secret`` is your endpoint's signing secret, or several (any may match: pass the old
    and the new one while you roll yours). The signed timestamp must be within
    ``tolerance`` seconds of ``now`` (default: the current time) in either direction, so a
    captured request cannot be replayed later. Comparisons are constant-time.

    Raises :class:`SignatureError` (a ``ValueError``) when the header is malformed, no
    signature matches (wrong secret, or the body was altered), the timestamp is out of
    tolerance, or the signed body is not a JSON object.
    """
    if not isinstance(payload, bytes | bytearray):
        raise SignatureError("payload must be the raw request body (bytes), not parsed JSON")
    if not isinstance(header, str) or not header.strip():
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    _verify(bytes(payload), header, secret, tolerance=tolerance, now=now)
    try:
        event = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"signed payload is not JSON: {exc}") from exc
    if not isinstance(event, dict):
        raise SignatureError("signed payload is not a JSON object")
    return event
