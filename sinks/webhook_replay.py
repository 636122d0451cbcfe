"""Replay merchant webhooks: send chosen deliveries again (dry run first).

A replay selects existing deliveries by event id, by payment id, or by the time they were
enqueued (``since`` <= ``created_at`` < ``until``), optionally of one endpoint only, and
sets each back to ``pending``, due now, whatever its status (delivered, dead, or pending
with a retry far away). The dispatcher then sends the same payload bytes with the same
``Paystream-Event-Id``. Attempt numbers keep counting and ``webhook_attempts`` keeps every
attempt; the retry schedule starts again from its first step (``schedule_offset``).

Deliveries of a disabled endpoint are selected too (the report shows it), but they are sent
only once the endpoint is enabled again.
"""

from __future__ import annotations

from typing import Self

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict, model_validator

from sinks.webhook_outbox import DELIVERY_COLUMNS, DeliveryRecord, delivery_from_row

__all__ = ["ReplayResult", "ReplaySelection", "replay_deliveries", "select_for_replay"]


class ReplaySelection(BaseModel):
    """Which deliveries to replay: exactly one of ``event_id``, ``payment_id``, ``since``."""

    model_config = ConfigDict(frozen=True)

    event_id: str | None = None
    payment_id: str | None = None
    since: AwareDatetime | None = None
    """Enqueued at or after (``webhook_deliveries.created_at``)."""
    until: AwareDatetime | None = None
    """Enqueued before; only with ``since``."""
    endpoint_id: int | None = None
    """Only this endpoint's deliveries."""

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        chosen = [
            name
            for name, value in (
                ("event_id", self.event_id),
                ("payment_id", self.payment_id),
                ("since", self.since),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "choose exactly one of event_id, payment_id or since "
                f"(got {', '.join(chosen) or 'none'})"
            )
        if self.until is not None:
            if self.since is None:
                raise ValueError("until needs since")
            if self.until <= self.since:
                raise ValueError("until must be after since")
        return self


class ReplayResult(BaseModel):
    """The selected deliveries (as they were before the replay) and what was done."""

    model_config = ConfigDict(frozen=True)

    executed: bool
    deliveries: list[DeliveryRecord]
    replayed: int
    """Deliveries set back to pending (0 in a dry run)."""


_SELECT = f"""
SELECT {DELIVERY_COLUMNS}
  FROM webhook_deliveries d JOIN merchant_endpoints e ON e.id = d.endpoint_id
 WHERE ($1::text IS NULL OR d.event_id = $1)
   AND ($2::text IS NULL OR d.payment_id = $2)
   AND ($3::timestamptz IS NULL OR d.created_at >= $3)
   AND ($4::timestamptz IS NULL OR d.created_at < $4)
   AND ($5::bigint IS NULL OR d.endpoint_id = $5)
 ORDER BY d.id
"""  # noqa: S608 (constant column list)

_RESET = """
UPDATE webhook_deliveries
   SET status = 'pending', next_attempt_at = now(), schedule_offset = attempts
 WHERE id = ANY ($1::bigint[])
"""


async def select_for_replay(
    conn: asyncpg.Connection, selection: ReplaySelection, *, lock: bool = False
) -> list[DeliveryRecord]:
    """The deliveries ``selection`` names, oldest first."""
    sql = _SELECT + (" FOR UPDATE OF d" if lock else "")
    rows = await conn.fetch(
        sql,
        selection.event_id,
        selection.payment_id,
        selection.since,
        selection.until,
        selection.endpoint_id,
    )
    return [delivery_from_row(row) for row in rows]


async def replay_deliveries(
    conn: asyncpg.Connection, selection: ReplaySelection, *, execute: bool = False
) -> ReplayResult:
    """Dry run (default): report what would be sent again. ``execute``: set the selected
    deliveries back to pending, due now, in one transaction."""
    if not execute:
        chosen = await select_for_replay(conn, selection)
        return ReplayResult(executed=False, deliveries=chosen, replayed=0)
    async with conn.transaction():
        chosen = await select_for_replay(conn, selection, lock=True)
        status: str = await conn.execute(_RESET, [d.id for d in chosen])
    return ReplayResult(
        executed=True, deliveries=chosen, replayed=int(status.rsplit(" ", 1)[-1])
    )
