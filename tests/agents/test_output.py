"""EventPublisher against a real broker: a refused record is never papered over."""

from __future__ import annotations

import pytest

from agents.output import EventPublisher, RecordsLost
from config.settings import Settings
from topics.catalog import EVENTS

pytestmark = pytest.mark.stack


async def test_flush_succeeds_when_every_record_is_acknowledged(live: Settings) -> None:
    publisher = EventPublisher(live)
    publisher.publish(EVENTS, b"k", b"{}")
    await publisher.flush(10)


async def test_a_refused_record_raises_records_lost_not_a_retryable_error(live: Settings) -> None:
    publisher = EventPublisher(live)
    # Partition 999 does not exist: the record is refused, not merely slow.
    publisher.publish(EVENTS, b"k", b"{}", partition=999)
    with pytest.raises(RecordsLost):
        await publisher.flush(10)
    await publisher.flush(10)  # nothing left queued: a retry would "succeed" silently
