"""No card number gets past intake, into an internal copy, a dead letter or a log line."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.events import rejection
from agents.intake import ADDRESSING_FIELDS, Accepted, DeadLetter, Rejected, parse_command
from ops.logs import JsonFormatter, PanScrubFilter
from schemas.dlq import scrub_record
from schemas.internal import Delayed, RetryCommand, RetryNotification
from schemas.pan import looks_like_pan, pan_fields

PAN = "4242424242424242"

BASE: dict[str, Any] = {
    "schema_version": 1,
    "command_id": "cmd_1",
    "merchant_id": "m_1",
    "idempotency_key": "key_1",
    "payment_id": "pay_1",
    "created_at": "2026-12-01T10:00:00Z",
}
COMMANDS: dict[str, dict[str, Any]] = {
    "authorize_payment": {
        "amount": 1000, "currency": "USD", "payment_method": "tok_visa",
        "capture_method": "automatic", "customer_id": "cus_1", "description": "order",
        "metadata": {"order_id": "o_1"},
    },
    "capture_payment": {"amount": 500},
    "void_payment": {},
    "refund_payment": {"refund_id": "re_1", "amount": 100, "reason": "requested"},
    "create_payout": {
        "payout_id": "po_1", "amount": 1000, "currency": "USD", "destination": "ba_token",
    },
}
# Every string field each command type has (plus an unknown extra field, which the wire
# contract lets producers add), and the metadata key and value.
STRING_FIELDS: dict[str, list[str]] = {
    kind: [
        *(k for k in BASE if k != "schema_version" and k != "created_at"),
        *(k for k, v in fields.items() if isinstance(v, str)),
        "note",
        *(["metadata.value", "metadata.key"] if kind == "authorize_payment" else []),
    ]
    for kind, fields in COMMANDS.items()
}


def luhn_complete(body: str) -> str:
    for check in "0123456789":
        candidate = body + check
        total = 0
        for index, char in enumerate(reversed(candidate)):
            value = int(char) * (2 if index % 2 else 1)
            total += value - 9 if value > 9 else value
        if total % 10 == 0:
            return candidate
    raise AssertionError("unreachable")


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    body = draw(st.text("0123456789", min_size=12, max_size=18))
    digits = luhn_complete(body)
    separator = draw(st.sampled_from(["", " ", "-"]))
    groups = [digits[i : i + 4] for i in range(0, len(digits), 4)]
    return separator.join(groups)


@st.composite
def commands_with_a_card_number(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    kind = draw(st.sampled_from(sorted(COMMANDS)))
    field = draw(st.sampled_from(STRING_FIELDS[kind]))
    number = draw(card_numbers())
    # Anything around it, as long as the number stands apart from it (a digit run glued to
    # letters is part of an id, see the next test).
    words = st.text("abcdefghijklmnopqrstuvwxyz", max_size=6)
    apart = st.sampled_from(["_", " ", ":", ".", "/", "#", "=", ",", "("])
    prefix = draw(st.one_of(st.just(""), st.tuples(words, apart).map("".join)))
    suffix = draw(st.one_of(st.just(""), st.tuples(apart, words).map("".join)))
    text = prefix + number + suffix
    data: dict[str, Any] = {**BASE, "type": kind, **json.loads(json.dumps(COMMANDS[kind]))}
    if field == "metadata.value":
        data["metadata"]["note"] = text
    elif field == "metadata.key":
        data["metadata"][text] = "x"
    else:
        data[field] = text
    return data, field, number


def digits_of(number: str) -> str:
    return number.replace(" ", "").replace("-", "")


@settings(max_examples=300, deadline=None)
@given(commands_with_a_card_number())
def test_a_card_number_in_any_field_of_any_command_never_passes_intake(
    case: tuple[dict[str, Any], str, str],
) -> None:
    data, field, number = case
    verdict = parse_command(json.dumps(data).encode())
    assert not isinstance(verdict, Accepted), f"accepted a PAN in {field}"
    said = verdict.reason if isinstance(verdict, Rejected) else verdict.message
    assert digits_of(number) not in digits_of(said) and not looks_like_pan(said)
    if isinstance(verdict, Rejected):
        assert "card number" in verdict.reason
        reply = rejection(None, verdict.envelope, verdict.reason).model_dump_json()
        assert not looks_like_pan(reply), reply
    else:
        assert isinstance(verdict, DeadLetter)
        # only when the number is where a rejection would have to repeat it
        assert field in ADDRESSING_FIELDS


def test_a_card_number_outside_the_addressing_fields_is_a_clear_rejection() -> None:
    for field in ("customer_id", "description", "note"):
        data = {**BASE, "type": "authorize_payment", **COMMANDS["authorize_payment"],
                field: f"x {PAN}"}
        verdict = parse_command(json.dumps(data).encode())
        assert isinstance(verdict, Rejected), field
        assert verdict.reason == (
            f"invalid_command: a card number (PAN) in {field}; send a PSP payment-method "
            "token, never a card number"
        )
    data = {**BASE, "type": "refund_payment", "refund_id": "re_1", "reason": PAN}
    verdict = parse_command(json.dumps(data).encode())
    assert isinstance(verdict, Rejected) and "in reason" in verdict.reason


@settings(max_examples=200, deadline=None)
@given(st.uuids(), st.uuids(), st.uuids())
def test_hexadecimal_ids_with_long_digit_runs_are_not_card_numbers(
    command_id: UUID, payment_id: UUID, key: UUID
) -> None:
    """About one random uuid hex in 500 holds a Luhn-valid run of 13-19 digits."""
    data = {**BASE, "type": "void_payment", "command_id": f"cmd_{command_id.hex}",
            "payment_id": f"pay_{payment_id.hex}", "idempotency_key": key.hex}
    assert isinstance(parse_command(json.dumps(data).encode()), Accepted)
    glued = {**data, "command_id": f"cmd_ab{PAN}cd", "payment_id": f"{PAN}ef"}
    assert isinstance(parse_command(json.dumps(glued).encode()), Accepted)


def test_pan_fields_names_nested_paths_without_the_number() -> None:
    data = {"a": [{"b": PAN}], PAN: "x", "ok": "tok_visa", "n": int(PAN), "flag": True}
    assert pan_fields(data) == ["a[0].b", "<key>", "n"]


def test_internal_copies_carry_scrubbed_bytes() -> None:
    now = datetime.now(UTC)
    retry = RetryCommand(
        payment_id="pay_1", attempt=1, command=json.dumps({"description": PAN}),
        original_topic="payments.commands", original_partition=0, original_offset=1,
        first_failure_at=now,
    )
    note = RetryNotification(payment_id="pay_1", attempt=1, notification=f'{{"x":"{PAN}"}}')
    parked = Delayed(due_at=now, target_topic="payments.internal", key="pay_1",
                     value=retry.model_dump_json(), kind="command")
    for text in (retry.model_dump_json(), note.model_dump_json(), parked.model_dump_json()):
        assert PAN not in text and "[PAN REDACTED]" in text


def test_dead_letter_key_value_and_headers_are_scrubbed() -> None:
    key, value, headers = scrub_record(
        PAN.encode(), f'{{"payment_id":"{PAN}"}}'.encode(),
        [("dlq.error_message", f"bad {PAN}".encode()), (f"h{PAN}", b"ok")],
    )
    assert key == b"[PAN REDACTED]"
    assert value == b'{"payment_id":"[PAN REDACTED]"}'
    assert headers == [("dlq.error_message", b"bad [PAN REDACTED]"),
                       ("h[PAN REDACTED]", b"ok")]
    assert scrub_record(b"pay_1", None, None) == (b"pay_1", None, None)
    # a key keeps addressing its payment when a hex id merely contains a Luhn-valid run
    assert scrub_record(f"pay_ab{PAN}cd".encode(), None, None)[0] == f"pay_ab{PAN}cd".encode()
    assert scrub_record(f"pay_{PAN}".encode(), None, None)[0] == b"pay_[PAN REDACTED]"


def test_log_lines_with_extras_go_through_the_scrubber() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(PanScrubFilter())
    logger = logging.getLogger("paystream.test.pan")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("payment %s failed", PAN,
                       extra={"payment_id": PAN, "merchant_id": f"m {PAN}", "raw": PAN.encode()})
        try:
            raise ValueError(f"card {PAN}")
        except ValueError:
            logger.exception("boom")
        record = logging.LogRecord("x", logging.INFO, "f", 1, "%s", (PAN,), None)
        record.attempt_id = int(PAN)
        handler.handle(record)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert PAN not in out, out
    first = json.loads(out.splitlines()[0])
    assert first["payment_id"] == "[PAN REDACTED]"
    assert first["message"] == "payment [PAN REDACTED] failed"
