"""paystream.webhooks.verify_signature: the helper merchants use (pure unit tests)."""

from __future__ import annotations

import json
import time

import pytest

from paystream import webhooks
from paystream.webhooks import SIGNATURE_HEADER, SignatureError, verify_signature
from schemas import signatures
from sinks.webhook_dispatcher import signature_header

SECRET = "whsec_test_current"
OLD_SECRET = "whsec_test_previous"
EVENT = {"type": "payment.captured", "event_id": "evt_1", "payment_id": "pay_1", "amount": 1999}
BODY = json.dumps(EVENT, separators=(",", ":")).encode()


def header(body: bytes = BODY, secrets: tuple[str, ...] = (SECRET,), at: int | None = None) -> str:
    return signature_header(body, secrets, int(time.time()) if at is None else at)


def test_valid_signature_returns_the_event() -> None:
    assert verify_signature(BODY, header(), SECRET) == EVENT
    assert SIGNATURE_HEADER == "Paystream-Signature"


def test_header_format_is_stripes() -> None:
    value = header(at=1_700_000_000)
    t, v1 = value.split(",")
    assert t == "t=1700000000"
    assert v1 == "v1=" + signatures.compute_signature(BODY, SECRET, 1_700_000_000)
    assert value == signatures.sign_payload(BODY, SECRET, 1_700_000_000)


def test_tampered_body_fails() -> None:
    signed = header()
    tampered = BODY.replace(b"1999", b"1")
    with pytest.raises(SignatureError, match="No signatures found"):
        verify_signature(tampered, signed, SECRET)
    with pytest.raises(SignatureError):
        verify_signature(BODY + b" ", signed, SECRET)  # even whitespace: verify raw bytes


def test_wrong_secret_fails() -> None:
    with pytest.raises(SignatureError, match="No signatures found"):
        verify_signature(BODY, header(), "whsec_someone_else")


def test_stale_and_far_future_timestamps_fail() -> None:
    now = int(time.time())
    with pytest.raises(SignatureError, match="old"):
        verify_signature(BODY, header(at=now - 301), SECRET, now=now)
    with pytest.raises(SignatureError, match="future"):
        verify_signature(BODY, header(at=now + 301), SECRET, now=now)
    # Within the tolerance, either way, passes; a custom tolerance is honoured.
    assert verify_signature(BODY, header(at=now - 300), SECRET, now=now) == EVENT
    assert verify_signature(BODY, header(at=now + 300), SECRET, now=now) == EVENT
    assert verify_signature(BODY, header(at=now - 3000), SECRET, 3600, now=now) == EVENT
    with pytest.raises(SignatureError):
        verify_signature(BODY, header(at=now - 61), SECRET, tolerance=60, now=now)


def test_stale_timestamp_fails_against_the_clock() -> None:
    with pytest.raises(SignatureError, match="tolerance"):
        verify_signature(BODY, header(at=int(time.time()) - 3600), SECRET)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "v1=abc",  # no timestamp
        "t=123",  # no signature
        "t=abc,v1=00",
        "t=1,t=2,v1=00",
        "t=1,,v1=00",
        "v0=00,t=1",  # no v1 signature
    ],
)
def test_malformed_headers_fail(bad: str) -> None:
    with pytest.raises(SignatureError):
        verify_signature(BODY, bad, SECRET)


def test_rotation_both_secrets_verify() -> None:
    both = header(secrets=(SECRET, OLD_SECRET))
    assert both.count("v1=") == 2
    assert verify_signature(BODY, both, SECRET) == EVENT
    assert verify_signature(BODY, both, OLD_SECRET) == EVENT
    # A receiver may also hold both secrets while it rolls its own configuration.
    assert verify_signature(BODY, header(secrets=(OLD_SECRET,)), [SECRET, OLD_SECRET]) == EVENT
    with pytest.raises(SignatureError):
        verify_signature(BODY, both, "whsec_neither")


def test_empty_secrets_are_refused() -> None:
    with pytest.raises(SignatureError):
        verify_signature(BODY, header(), "")
    with pytest.raises(SignatureError):
        verify_signature(BODY, header(), [])


def test_payload_must_be_raw_bytes_and_a_json_object() -> None:
    with pytest.raises(SignatureError, match="raw request body"):
        verify_signature(BODY.decode(), header(), SECRET)  # type: ignore[arg-type]
    for body in (b"[1, 2]", b"not json", b"\xff\xfe"):
        with pytest.raises(SignatureError):
            verify_signature(body, header(body), SECRET)


def test_signature_error_is_a_value_error_and_reexported() -> None:
    assert webhooks.SignatureError is signatures.SignatureError
    assert issubclass(SignatureError, ValueError)
