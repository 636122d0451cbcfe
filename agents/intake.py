"""Intake: turn raw command bytes into a valid command, a rejection, or a DLQ verdict.

Pure functions, no I/O. Two layers (see schemas.commands): bytes that are not JSON or whose
envelope (type, schema_version, ids) is invalid cannot be answered to a merchant and go to
the dead-letter topic; an addressable command with invalid business fields becomes a
``payment.rejected`` event whose reason says what was wrong.
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
from schemas.pan import looks_like_pan, scrub_pans


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
    try:
        command = COMMAND_ADAPTER.validate_python(data)
    except ValidationError as exc:
        reason = describe_validation_error(exc)
        if looks_like_pan(reason):  # never echo a card number back
            reason = scrub_pans(reason)
        return Rejected(envelope, f"invalid_command: {reason}")
    return Accepted(command, fingerprint(command))
