"""Intake: turn raw command bytes into a valid command, a rejection, or a DLQ verdict.

Pure functions, no I/O. Two layers (see schemas.commands): bytes that are not JSON or whose
envelope (type, schema_version, ids) is invalid cannot be answered to a merchant and go to
the dead-letter topic; an addressable command with invalid business fields becomes a
``payment.rejected`` event whose reason says what was wrong.

No card numbers (SPEC money rule 8): a command with a Luhn-valid 13-19 digit number in any
field, at any depth, metadata keys and unknown extra fields included, is rejected, and the
reason names the field, never the number. When the number is in a field the rejection
would repeat (payment_id, merchant_id, idempotency_key, command_id) the record goes to the
dead-letter topic instead, scrubbed like every dead letter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pydantic import ValidationError

from schemas.commands import (
    COMMAND_ADAPTER,
    Command,
    CommandEnvelope,
    describe_validation_error,
)
from schemas.pan import looks_like_pan, pan_fields, scrub_pans


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The bytes cannot be processed; ``reason`` is a short machine-readable code."""

    reason: str
    error_type: str
    message: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The command is addressable but invalid."""

    envelope: CommandEnvelope
    reason: str


@dataclass(frozen=True, slots=True)
class Accepted:
    command: Command
    fingerprint: str


IntakeResult = DeadLetter | Rejected | Accepted

ADDRESSING_FIELDS = frozenset({"payment_id", "merchant_id", "idempotency_key", "command_id"})
"""Fields a ``payment.rejected`` event (and its Kafka key) repeats."""


def fingerprint(command: Command) -> str:
    """SHA-256 over the idempotency-relevant payload (all but command_id, created_at)."""
    payload = json.dumps(command.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def parse_command(raw: bytes | None) -> IntakeResult:
    """Classify one record value from ``payments.commands``."""
    if raw is None:
        return DeadLetter("empty_value", "EmptyValue", "record has no value")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return DeadLetter("invalid_json", type(exc).__name__, scrub_pans(str(exc))[:500])
    if not isinstance(data, dict):
        return DeadLetter("not_an_object", "TypeError", "command must be a JSON object")
    version = data.get("schema_version")
    if version != 1:
        return DeadLetter(
            "unknown_schema_version",
            "UnsupportedSchemaVersion",
            f"schema_version {scrub_pans(repr(version))[:50]} is not supported (expected 1)",
        )
    try:
        envelope = CommandEnvelope.model_validate(data)
    except ValidationError as exc:
        return DeadLetter("schema_violation", "ValidationError", describe_validation_error(exc))
    pans = pan_fields(data)
    if pans:
        where = ", ".join(pans[:10])
        if ADDRESSING_FIELDS & set(pans):
            # Answering would put the number on payments.events, in the status view and in
            # the merchant's webhook: park the (scrubbed) record for an operator instead.
            return DeadLetter(
                "card_number", "CardNumber",
                f"a card number (PAN) in {where}: the command cannot be answered without "
                "echoing it",
            )
        return Rejected(
            envelope,
            f"invalid_command: a card number (PAN) in {where}; send a PSP payment-method "
            "token, never a card number",
        )
    try:
        command = COMMAND_ADAPTER.validate_python(data)
    except ValidationError as exc:
        reason = describe_validation_error(exc)
        if looks_like_pan(reason):  # never echo a card number back
            reason = scrub_pans(reason)
        return Rejected(envelope, f"invalid_command: {reason}")
    return Accepted(command, fingerprint(command))
