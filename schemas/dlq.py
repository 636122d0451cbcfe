"""The dead-letter envelope: where a record failed, why, and how to find its origin.

A DLQ record keeps the original key and value bytes (with anything that looks like a card
number scrubbed) so that ``paystream dlq replay`` can re-publish them unchanged; the
envelope travels in Kafka headers named ``dlq.*``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict

from schemas.pan import scrub_bytes, scrub_pans

HEADER_PREFIX = "dlq."


class DlqEnvelope(BaseModel):
    """Metadata about a dead-lettered record, carried as ``dlq.*`` headers."""

    model_config = ConfigDict(frozen=True)

    stage: str
    reason: str
    error_type: str
    error_message: str
    original_topic: str
    original_partition: int
    original_offset: int
    original_timestamp: AwareDatetime | None = None
    consumer_group: str
    attempts: int = 1
    first_failure_at: AwareDatetime
    last_failure_at: AwareDatetime

    def to_headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers; every value UTF-8, PAN-scrubbed."""
        out: list[tuple[str, bytes]] = []
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue
            text = scrub_pans(str(value))[:2000]
            out.append((HEADER_PREFIX + name, text.encode()))
        return out

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | None) -> DlqEnvelope:
        fields = {
            name[len(HEADER_PREFIX) :]: value.decode()
            for name, value in headers or []
            if name.startswith(HEADER_PREFIX)
        }
        return cls.model_validate(fields)


def scrub_payload(raw: bytes) -> bytes:
    """The original bytes with card-number-like digit runs replaced."""
    return scrub_bytes(raw) or b""


def is_dlq_topic(topic: str) -> bool:
    """Dead-letter topics are named ``<topic>.dlq`` (see topics.catalog)."""
    return topic.endswith(".dlq")


def scrub_record(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]] | None
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]:
    """A DLQ record's key, value and headers (names and values) with PANs replaced.

    The key only loses standalone numbers (``4242...``, ``pay_4242...``): a replay must
    still address the payment when its id is a random hex string that happens to hold a
    Luhn-valid digit run (intake refuses commands keyed by a standalone one)."""
    clean_headers = None
    if headers is not None:
        clean_headers = [
            (scrub_pans(name), scrub_bytes(value) or b"") for name, value in headers
        ]
    return scrub_bytes(key, standalone_only=True), scrub_bytes(value), clean_headers


def now_utc() -> datetime:
    return datetime.now(UTC)
