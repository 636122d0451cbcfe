"""A PSP's settlement report: the CSV format, its rows, a parser and a writer.

One row per money movement the PSP reports, with exactly these columns::

    reference,type,amount,currency,fee,status,timestamp

- ``reference``: the PSP's id of the object: the payment intent (``pi_...``) for a
  ``charge`` and for a ``dispute`` (so a dispute matches its payment), the refund
  (``re_...``) for a ``refund``, the payout (``po_...``) for a ``payout``. Our own
  payment ids are nowhere in the file: reconciliation matches on ``reference``.
- ``type``: ``charge`` | ``refund`` | ``dispute`` | ``payout``.
- ``amount``: positive integer in minor units; the direction comes from ``type``
  (a refund, a dispute or a payout takes money out of the merchant's balance).
- ``currency``: lower-case ISO 4217 code in the file (Stripe's style);
  :func:`parse_settlement_csv` returns it upper-case, as everywhere else in paystream.
- ``fee``: the PSP's fee for that row, integer minor units, never negative.
- ``status``: the PSP's status of the object (``succeeded``, ``failed``, ``pending``,
  ``paid``, ``needs_response``, ...).
- ``timestamp``: RFC 3339, UTC (``2024-05-01T12:00:00Z``): capture time for a charge,
  creation time otherwise.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import UTC
from typing import Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

__all__ = [
    "SETTLEMENT_COLUMNS",
    "SettlementError",
    "SettlementRow",
    "SettlementType",
    "format_settlement_csv",
    "parse_settlement_csv",
]

SETTLEMENT_COLUMNS: tuple[str, ...] = (
    "reference",
    "type",
    "amount",
    "currency",
    "fee",
    "status",
    "timestamp",
)

SettlementType = Literal["charge", "refund", "dispute", "payout"]


class SettlementError(ValueError):
    """The settlement file does not follow the format (bad header or row)."""


class SettlementRow(BaseModel):
    """One line of a settlement report; money in integer minor units."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: str = Field(min_length=1)
    type: SettlementType
    amount: int = Field(ge=0, strict=True)
    currency: str = Field(min_length=3, max_length=3)
    """Upper-case ISO 4217 (normalised on the way in; the file itself is lower-case)."""
    fee: int = Field(ge=0, strict=True)
    status: str = Field(min_length=1)
    timestamp: AwareDatetime

    @field_validator("currency")
    @classmethod
    def _upper_case(cls, value: str) -> str:
        return value.upper()


def _rfc3339(row: SettlementRow) -> str:
    return row.timestamp.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_settlement_csv(rows: Iterable[SettlementRow]) -> str:
    """Write rows as the settlement CSV (header first, ``\\r\\n`` line ends)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(SETTLEMENT_COLUMNS)
    for row in rows:
        writer.writerow(
            [row.reference, row.type, row.amount, row.currency.lower(), row.fee, row.status,
             _rfc3339(row)]
        )
    return out.getvalue()


def _int_cell(value: str, column: str, line: int) -> int:
    text = value.strip()
    if not text.isascii() or not text.lstrip("-").isdigit():
        raise SettlementError(f"line {line}: {column} must be an integer, got {value!r}")
    return int(text)


def parse_settlement_csv(text: str) -> list[SettlementRow]:
    """Parse a settlement CSV; raises :class:`SettlementError` (a ``ValueError``) if malformed.

    The header must be exactly :data:`SETTLEMENT_COLUMNS`; blank lines are skipped.
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(cell.strip() for cell in header) != SETTLEMENT_COLUMNS:
        raise SettlementError(f"bad header {header!r}: expected {','.join(SETTLEMENT_COLUMNS)}")
    rows: list[SettlementRow] = []
    for cells in reader:
        line = reader.line_num
        if not cells or all(not cell.strip() for cell in cells):
            continue
        if len(cells) != len(SETTLEMENT_COLUMNS):
            raise SettlementError(
                f"line {line}: expected {len(SETTLEMENT_COLUMNS)} columns, got {len(cells)}"
            )
        reference, kind, amount, currency, fee, status, timestamp = (c.strip() for c in cells)
        try:
            rows.append(
                SettlementRow.model_validate(
                    {
                        "reference": reference,
                        "type": kind,
                        "amount": _int_cell(amount, "amount", line),
                        "currency": currency,
                        "fee": _int_cell(fee, "fee", line),
                        "status": status,
                        "timestamp": timestamp,
                    }
                )
            )
        except ValidationError as exc:
            raise SettlementError(f"line {line}: {exc}") from exc
    return rows
